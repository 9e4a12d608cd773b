"""A model saved from a sharded layout is the same model to transformers: config.json carries every
field of the source's (llama3 rope scaling, tied embeddings, ...), and transformers' outputs from the
export equal meshrl's from the layout that saved it."""
import json
import os

import pytest
import torch

from meshrl.engine.generation import stage_pass
from meshrl.engine.model import PackedMeta, build_stage, save_hf
from meshrl.parallel import mappings
from meshrl.parallel.layout import ParallelLayout
from meshrl.testing.tiny_models import make_tiny_hf

LENGTHS = [40, 7]  # 40 > the llama3 rope's original 32 positions
# fp32 in both; meshrl's tp2·pp2 run and transformers' differ only in summation order (tp
# all-reduce, per-sequence attention): measured max |diff| 9.2e-6 (llama, logits up to |5.5|),
# 8.5e-6 (qwen2, up to |6.5|), 4.2e-6 (critic values, up to |4.8|); the bound is
# test_model_parity.py's.
ATOL = 2e-5


def _export_and_run(src, dst, tp, pp, head, ids):
    """Load `src` into tp×pp, save it to `dst`; the last stage's tp rank 0 returns its outputs
    (full-vocabulary logits or per-token values) for the packed `ids`."""
    import torch.distributed as dist
    layout = ParallelLayout(ranks=list(range(dist.get_world_size())), tp=tp, pp=pp)
    stage = build_stage(layout, model_dir=src, head=head)
    save_hf(stage, dst, tokenizer_dir=src)
    meta = PackedMeta.from_lengths([len(x) for x in ids])
    with torch.no_grad():
        h = stage_pass(stage, torch.cat(ids), meta)
        if h is None:
            return None
        if head == "lm":
            out = mappings.all_gather_dim(stage.logits(h), -1, layout.tp_group)[:, :stage.cfg.vocab_size]
        else:
            out = stage.values(h)
    return out if layout.tp_rank == 0 else None


def _architecture(kind, suffix):
    return {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind] + suffix


def _ids():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 101, (n,), generator=g) for n in LENGTHS]


def _assert_config_kept(src, out, architecture):
    with open(os.path.join(src, "config.json")) as f:
        src_cfg = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        out_cfg = json.load(f)
    assert out_cfg["architectures"] == [architecture]
    for key, value in src_cfg.items():
        if key != "architectures":
            got = out_cfg.get(key, "<missing>")
            assert got == value, f"config.json[{key!r}]: {got} != the source's {value}"
    # Keys save_hf writes that the source may lack; each must restate what the source implies.
    implied = {
        "rope_theta": src_cfg["rope_parameters"]["rope_theta"],  # the transformers 4 spelling
        "torch_dtype": src_cfg["dtype"],  # the old name of dtype
        "head_dim": src_cfg["hidden_size"] // src_cfg["num_attention_heads"],  # qwen2 omits it
    }
    if architecture.endswith("ForSequenceClassification"):  # one score: a critic or reward model
        implied.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    for key in set(out_cfg) - set(src_cfg):
        assert key in implied and out_cfg[key] == implied[key], f"config.json[{key!r}] = {out_cfg[key]} added"
    return out_cfg


def _hf_outputs(path, ids, head):
    """transformers' logits, or per-token scores (the score head applied at every position: the
    sequence-classification output is only the last token's)."""
    import transformers
    with torch.no_grad():
        if head == "lm":
            model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
            return [model(x[None]).logits[0] for x in ids]
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
        outs = []
        for x in ids:
            per_token = model.score(model.model(x[None]).last_hidden_state)[0, :, 0]
            assert torch.equal(model(x[None]).logits[0, 0], per_token[-1])  # what HF users read
            outs.append(per_token)
        return outs


@pytest.mark.parametrize("kind,tp,pp", [
    ("llama", 2, 2),  # llama3 rope scaling, untied head
    ("qwen2", 2, 2),  # tied embeddings: both pipeline ends hold the matrix, stage 0 writes it
    ("qwen3", 2, 2),  # q/k norms, head_dim 24
])
def test_export_from_tp2_pp2_is_the_same_model_to_transformers(dist_pool, tmp_path, kind, tp, pp):
    src = make_tiny_hf(kind, str(tmp_path / "src"), seed=21)
    out = str(tmp_path / "out")
    ids = _ids()
    results = dist_pool(tp * pp).run(_export_and_run, src, out, tp, pp, "lm", ids)
    ours = torch.cat([r for r in results if r is not None])

    cfg = _assert_config_kept(src, out, _architecture(kind, "ForCausalLM"))
    if kind == "llama":
        assert cfg["rope_parameters"]["rope_type"] == "llama3"  # the case is the one it claims
    elif kind == "qwen3":
        assert cfg["head_dim"] == 24 and cfg["architectures"] == ["Qwen3ForCausalLM"]
    else:
        assert cfg["tie_word_embeddings"] is True
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            names = json.load(f)["weight_map"]
        assert "lm_head.weight" not in names  # tied: the embedding alone, as transformers saves it

    exported, source = _hf_outputs(out, ids, "lm"), _hf_outputs(src, ids, "lm")
    for e, s in zip(exported, source):
        # same tensors bit for bit and the same config: transformers must compute identically
        assert torch.equal(e, s)
    err = (torch.cat(exported) - ours).abs().max().item()
    assert err <= ATOL, f"{kind}: transformers on the export vs meshrl tp{tp}·pp{pp}: {err}"


@pytest.mark.parametrize("source_head", [
    "value",  # a reward model or saved critic
    "lm",  # a critic made from a causal LM (fresh zero head): the export must say num_labels=1
])
def test_critic_export_from_tp2_pp2_scores_every_token_like_transformers(dist_pool, tmp_path,
                                                                         source_head):
    src = make_tiny_hf("llama", str(tmp_path / "src"), seed=22, head=source_head)
    out = str(tmp_path / "out")
    ids = _ids()
    results = dist_pool(4).run(_export_and_run, src, out, 2, 2, "value", ids)
    ours = torch.cat([r for r in results if r is not None])
    cfg = _assert_config_kept(src, out, "LlamaForSequenceClassification")
    assert cfg["id2label"] == {"0": "LABEL_0"}  # num_labels=1, as transformers writes it
    exported = _hf_outputs(out, ids, "value")
    if source_head == "value":
        for e, s in zip(exported, _hf_outputs(src, ids, "value")):
            assert torch.equal(e, s)
    err = (torch.cat(exported) - ours).abs().max().item()
    assert err <= ATOL, f"critic: transformers on the export vs meshrl tp2·pp2: {err}"
