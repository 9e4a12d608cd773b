"""Hugging Face checkpoints in and out of any layout."""
import json
import os

import pytest
import torch

from meshrl.engine.model import ConfigError, PackedMeta, build_stage, load_config, save_hf
from meshrl.engine.generate import stage_pass
from meshrl.parallel.layout import LayoutError, ParallelLayout
from meshrl.testing.tiny_models import make_tiny_hf


def _world():
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_initialized() else 1


def _load_save(src, dst, tp, pp, dp, head):
    layout = ParallelLayout(ranks=list(range(_world())), tp=tp, pp=pp, dp=dp)
    stage = build_stage(layout, model_dir=src, head=head)
    save_hf(stage, dst, tokenizer_dir=src)
    return stage.load_report["bytes_read"]


def _state(path):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_load_save_load_is_bit_exact_in_tp2_pp2(dist_pool, tmp_path, kind):
    src = make_tiny_hf(kind, str(tmp_path / "src"), seed=4)
    dist_pool(4).run(_load_save, src, str(tmp_path / "a"), 2, 2, 1, "lm")
    _load_save(str(tmp_path / "a"), str(tmp_path / "b"), 1, 1, 1, "lm")
    orig, a, b = _state(src), _state(tmp_path / "a"), _state(tmp_path / "b")
    assert sorted(a) == sorted(orig) == sorted(b)  # tied checkpoints keep no lm_head.weight
    for k in orig:
        assert torch.equal(orig[k], a[k]) and torch.equal(a[k], b[k]), k
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"))
    assert type(m).__name__.endswith("ForCausalLM")


def test_bytes_read_per_rank_is_about_its_share(dist_pool, tmp_path):
    src = make_tiny_hf("llama", str(tmp_path / "src"), seed=5)
    total = sum(t.numel() * t.element_size() for t in _state(src).values())
    per_rank = dist_pool(4).run(_load_save, src, str(tmp_path / "o"), 2, 2, 1, "lm")
    # each of 4 ranks owns ~1/4 of the weights; norms are replicated over tp, so a little more
    for b in per_rank:
        assert total / 4 * 0.9 <= b <= total / 4 * 1.15, (b, total)
    assert sum(per_rank) >= total  # together they read everything


def test_critic_saves_as_sequence_classification_with_same_scores(dist_pool, tmp_path):
    import transformers
    src = make_tiny_hf("llama", str(tmp_path / "src"), seed=6, head="value")
    dist_pool(2).run(_load_save, src, str(tmp_path / "out"), 1, 2, 1, "value")
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    assert hf.config.num_labels == 1
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=str(tmp_path / "out"), head="value")
    ids = torch.tensor([5, 6, 7, 8, 9, 10])
    with torch.no_grad():
        ours = stage.values(stage_pass(stage, ids, PackedMeta.from_lengths([6])))[-1]
        ref = hf(ids[None]).logits[0, 0]
    assert abs(ours.item() - ref.item()) < 1e-5


def test_critic_from_causal_lm_gets_fresh_zero_head(tmp_path):
    src = make_tiny_hf("llama", str(tmp_path / "src"), seed=7)
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=src, head="value")
    assert stage.load_report["initialised"] == ["score.weight"]
    assert torch.count_nonzero(stage.score.weight) == 0


def test_pytorch_bin_checkpoints_load(tmp_path):
    import transformers
    src = make_tiny_hf("mistral", str(tmp_path / "src"), seed=8)
    m = transformers.AutoModelForCausalLM.from_pretrained(src)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    os.makedirs(tmp_path / "bin")
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    with open(tmp_path / "bin" / "config.json", "w") as f:
        json.dump(json.load(open(os.path.join(src, "config.json"))), f)
    a = build_stage(ParallelLayout(ranks=[0]), model_dir=str(tmp_path / "bin"))
    b = build_stage(ParallelLayout(ranks=[0]), model_dir=src)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "unknown architecture"),
    (lambda c: c.pop("hidden_size"), "missing config key 'hidden_size'"),
])
def test_bad_config_errors(tmp_path, edit, needle):
    src = make_tiny_hf("llama", str(tmp_path / "m"), seed=9)
    cfg = json.load(open(os.path.join(src, "config.json")))
    edit(cfg)
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(ConfigError, match=needle):
        load_config(src)


def test_layout_errors(tmp_path):
    src = make_tiny_hf("llama", str(tmp_path / "m"), seed=10)
    cfg = load_config(src)
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible by tp=3"):
        build_stage(ParallelLayout(ranks=[0, 1, 2], tp=3, virtual=True, as_rank=0), config=cfg)
    with pytest.raises(ConfigError, match="4 layers cannot fill pp=8"):
        build_stage(ParallelLayout(ranks=list(range(8)), pp=8, virtual=True, as_rank=0), config=cfg)
    with pytest.raises(LayoutError, match="has 3 ranks but tp\\*pp\\*dp"):
        ParallelLayout(ranks=[0, 1, 2], tp=2)
    with pytest.raises(LayoutError, match="outside the world"):
        ParallelLayout(ranks=[0, 5], tp=2, world_size=2)
