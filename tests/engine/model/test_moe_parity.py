"""Mixture-of-experts models (Qwen3-MoE: top-3 of 8 unnormalised, one dense layer; Mixtral: top-2 of
4) reproduce transformers: logits in layouts with expert parallelism (ep=2, ep2·tp2, pp2·ep2, ep4,
ep2 with two copies of the experts), and gradients, including the load-balancing and z-losses,
against transformers' own modules and load_balancing_loss_func."""
import contextlib

import pytest
import torch

from meshrl.engine.model import PackedMeta, build_stage, load_config
from meshrl.engine.model.moe import SparseMoE
from meshrl.parallel import mappings
from meshrl.parallel.layout import ParallelLayout
from meshrl.testing.tiny_models import make_tiny_hf
from tests.engine.model.test_hf_interop import _state
from tests.engine.model.test_model_parity import (assert_shard_close, check_logits,
                                                  reference_models)

KINDS = ["qwen3_moe", "mixtral"]
LENGTHS = [5, 40, 1, 17]
# (tp, pp, dp, ep); logits within test_model_parity.py's ATOL (fp32 summation orders only)
LAYOUTS = [(1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 1, 1), (1, 1, 2, 2), (2, 1, 2, 2), (1, 2, 2, 2),
           (1, 1, 4, 4), (1, 1, 4, 2)]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    return reference_models(tmp_path_factory, KINDS, LENGTHS)


def _layout(tp, pp, dp, ep):
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    return ParallelLayout(ranks=list(range(world)), tp=tp, pp=pp, dp=dp, ep=ep)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "tp%d-pp%d-dp%d-ep%d" % l)
def test_moe_logits_match_transformers(dist_pool, moe_models, layout):
    check_logits(dist_pool, moe_models, KINDS, layout)


def hf_grad(ref: dict, name: str, cfg) -> torch.Tensor:
    """transformers' gradient for a meshrl (checkpoint) name: its in-memory modules fuse each
    layer's experts into gate_up_proj [E, 2F, H] and down_proj [E, H, F], Mixtral's under mlp."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    if ".experts." not in name:
        return ref[name]
    head, rest = name.split(".experts.")
    j, proj = rest.split(".")[:2]
    j, f = int(j), cfg.expert_intermediate_size
    if proj in ("gate_proj", "w1"):
        return ref[head + ".experts.gate_up_proj"][j, :f]
    if proj in ("up_proj", "w3"):
        return ref[head + ".experts.gate_up_proj"][j, f:]
    return ref[head + ".experts.down_proj"][j]


GRAD_LENGTHS = [5, 40, 1, 18]  # 64 tokens: sequence parallelism splits them over tp
AUX, Z = 0.5, 0.1  # large, so a wrong loss weighting moves the router's gradient visibly


def _replica_grads(path, ids, layout_sizes, sp, seed, router_losses):
    """Run on every rank: replica d takes sequences d, d+dp, ...; the weighted logit sum (plus the
    router losses over the whole batch) backward; dense gradients summed over dp, experts' over
    the ranks holding the same experts, as the optimizer sums them. Returns this rank's shards."""
    import torch.distributed as dist
    from meshrl.parallel.layers import sync_tp_partial_grads
    tp, pp, dp, ep = layout_sizes
    layout = _layout(tp, pp, dp, ep)
    stage = build_stage(layout, model_dir=path, sequence_parallel=sp)
    mine = list(range(layout.dp_rank, len(ids), dp))
    meta = PackedMeta.from_lengths([len(ids[i]) for i in mine])
    total = sum(len(x) for x in ids)
    ctx = stage.router_losses.step(total, AUX, Z) if router_losses else contextlib.nullcontext()
    with ctx:
        h = stage(torch.cat([ids[i] for i in mine]), meta)
        logits = mappings.gather_from_tp(stage.logits(h), layout.tp_group)[:, :101]
        cu = meta.cu_seqlens.tolist()
        # the same weights as the single-process reference draws for the whole batch, per sequence
        weights = torch.randn((sum(len(x) for x in ids), 101),
                              generator=torch.Generator().manual_seed(seed))
        starts = [sum(len(x) for x in ids[:i]) for i in range(len(ids))]
        w = torch.cat([weights[starts[i]:starts[i] + len(ids[i])] for i in mine])
        assert w.shape == logits.shape and cu[-1] == w.shape[0]
        (logits * w).sum().backward()
    sync_tp_partial_grads(list(stage.parameters()), layout.tp_group)
    out = {}
    for p in stage.parameters():
        g = p.grad.clone()
        group = layout.edp_group if getattr(p, "expert_parallel", False) else layout.dp_group
        if group is not None:
            dist.all_reduce(g, group=group)
        out[p.shard_spec.name] = (p.shard_spec, g)
    metrics = stage.router_losses.metrics(layout) if router_losses else {}
    return out, metrics


def _reference_grads(path, ids, seed, dp, router_losses):
    """transformers' gradients of the same objective; the router losses per replica microbatch
    (sequences d, d+dp, ... packed), weighted by its share of the batch's tokens, mean over layers."""
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    cfg = model.config
    E = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    k = cfg.num_experts_per_tok
    outs = [model(x[None], output_router_logits=True) for x in ids]
    logits = torch.cat([o.logits[0] for o in outs])
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    loss = (logits * weights).sum()
    aux_value = z_value = 0.0
    if router_losses:
        total = sum(len(x) for x in ids)
        n_layers = len(outs[0].router_logits)
        for d in range(dp):
            mine = list(range(d, len(ids), dp))
            n = sum(len(ids[i]) for i in mine)
            for layer in range(n_layers):
                rl = torch.cat([outs[i].router_logits[layer].reshape(len(ids[i]), E) for i in mine])
                aux = load_balancing_loss_func((rl,), E, k)
                z = torch.logsumexp(rl.float(), -1).square().mean()
                loss = loss + (AUX * aux + Z * z) * n / total / n_layers
                aux_value += float(aux.detach()) * n / total / n_layers
                z_value += float(z.detach()) * n / total / n_layers
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, aux_value, z_value


GRAD_LAYOUTS = [((2, 1, 1, 1), False), ((2, 1, 1, 1), True), ((1, 1, 2, 2), False),
                ((2, 1, 2, 2), True), ((1, 1, 4, 2), False), ((1, 1, 4, 4), False)]


@pytest.mark.parametrize("layout,sp", GRAD_LAYOUTS,
                         ids=lambda v: "tp%d-pp%d-dp%d-ep%d" % v if isinstance(v, tuple) else
                         ("sp" if v else "nosp"))
def test_moe_gradients_with_router_losses_match_transformers(dist_pool, moe_models, layout, sp):
    """Every shard's gradient (dense summed over dp, experts over their copies) equals transformers'
    gradient of the same objective, router losses included; the reported losses equal the oracle's."""
    from meshrl.engine.model.config import load_config
    g = torch.Generator().manual_seed(3)
    world = layout[0] * layout[1] * layout[2]
    for kind in KINDS:
        path = moe_models[kind][0]
        cfg = load_config(path)
        ids = [torch.randint(0, 101, (n,), generator=g) for n in GRAD_LENGTHS]
        ref, aux, z = _reference_grads(path, ids, 11, layout[2], True)
        results = dist_pool(world).run(_replica_grads, path, ids, layout, sp, 11, True)
        seen = set()
        for shards, metrics in results:
            assert metrics["router/aux_loss"] == pytest.approx(aux, rel=1e-5), kind
            assert metrics["router/z_loss"] == pytest.approx(z, rel=1e-5), kind
            for name, (spec, grad) in shards.items():
                seen.add(name)
                assert_shard_close(grad, spec, hf_grad(ref, name, cfg),
                                   f"{kind} {layout} sp={sp} {name}")
        experts = {n for n in seen if ".experts." in n}
        assert len(experts) == 3 * cfg.num_experts * len(cfg.moe_layers), kind


def _load_save(src, dst, layout_sizes):
    from meshrl.engine.model import save_hf
    layout = _layout(*layout_sizes)
    stage = build_stage(layout, model_dir=src)
    save_hf(stage, dst, tokenizer_dir=src)
    names = sorted(p.shard_spec.name for p in stage.parameters())
    held = sum(p.shard_spec.numel_valid() * p.element_size() for p in stage.parameters())
    return layout.ep_rank, stage.load_report["bytes_read"] == held, names


@pytest.mark.parametrize("kind,layout", [("qwen3_moe", (2, 1, 2, 2)), ("mixtral", (1, 2, 2, 2)),
                                         ("mixtral", (1, 1, 4, 4))],
                         ids=["qwen3_moe-tp2-ep2", "mixtral-pp2-ep2", "mixtral-ep4"])
def test_moe_load_save_load_is_bit_exact(dist_pool, tmp_path, kind, layout):
    """Loaded into an expert-parallel layout (each rank reading only its own experts) and saved
    back: the files hold exactly the source's tensors, bit for bit, load again single-process to
    the same, and transformers loads them."""
    import transformers
    src = make_tiny_hf(kind, str(tmp_path / "src"), seed=4)
    world = layout[0] * layout[1] * layout[2]
    results = dist_pool(world).run(_load_save, src, str(tmp_path / "a"), layout)
    _load_save(str(tmp_path / "a"), str(tmp_path / "b"), (1, 1, 1, 1))
    orig, a, b = _state(src), _state(tmp_path / "a"), _state(tmp_path / "b")
    assert sorted(a) == sorted(orig) == sorted(b)
    for k in orig:
        assert torch.equal(orig[k], a[k]) and torch.equal(a[k], b[k]), k
    ep = layout[3]
    experts_of = {}
    assert all(read_own for _, read_own, _ in results)  # every rank read exactly what it holds
    for ep_rank, _, names in results:
        experts_of.setdefault(ep_rank, set()).update(
            int(n.split(".experts.")[1].split(".")[0]) for n in names if ".experts." in n)
    n_experts = load_config(src).num_experts
    assert {r: sorted(e) for r, e in experts_of.items()} == {
        r: list(range(r * n_experts // ep, (r + 1) * n_experts // ep)) for r in range(ep)}
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"))
    assert type(m).__name__ == transformers.AutoConfig.from_pretrained(src).architectures[0]


@pytest.mark.parametrize("kind,sizes,needle", [
    ("mixtral", dict(dp=3, ep=3), "actor_train: ep=3 does not divide num_experts=4"),
    ("llama", dict(dp=2, ep=2), "actor_train: ep=2 but the model has no experts"),
    ("mixtral", dict(dp=6, ep=4), "actor_train.ep=4 does not divide dp=6"),
    ("qwen3_moe", dict(tp=3, dp=1), "actor_train: the experts' intermediate size 32 is not divisible by tp=3"),
])
def test_bad_expert_layouts_are_one_line_errors(tmp_path, kind, sizes, needle):
    from meshrl.engine.model import LlamaStage
    from meshrl.engine.model.config import ConfigError
    from meshrl.parallel.layout import LayoutError
    cfg = load_config(make_tiny_hf(kind, str(tmp_path / kind), seed=0,
                                   **({"num_attention_heads": 3, "num_key_value_heads": 3,
                                       "mlp_only_layers": []} if sizes.get("tp") == 3 else {})))
    n = sizes.get("tp", 1) * sizes["dp"]
    with pytest.raises((ConfigError, LayoutError)) as e:
        layout = ParallelLayout(ranks=list(range(n)), virtual=True, as_rank=0, name="actor_train",
                                **sizes)
        LlamaStage(cfg, layout, device="meta")
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_grouped_gemm_path_equals_the_loop(moe_models):
    """The grouped-GEMM path (torch._grouped_mm, CUDA's default for bf16) gives the loop's outputs
    and gradients; fp32 on CPU, where torch runs it too."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")  # torch >= 2.8 has it; 2.13 is what CI installs
    path, ids, _ = moe_models["qwen3_moe"]
    x = torch.cat(ids)
    meta = PackedMeta.from_lengths([len(s) for s in ids])
    out = {}
    for grouped in (False, True):
        stage = build_stage(ParallelLayout(ranks=[0]), model_dir=path)
        for layer in stage.model.layers.values():
            if isinstance(layer.feed_forward, SparseMoE):
                layer.feed_forward.grouped = grouped
        h = stage(x, meta)
        loss = (stage.logits(h) * torch.linspace(-1, 1, 101)).sum()
        loss.backward()
        out[grouped] = (h.detach(), {n: p.grad for n, p in stage.named_parameters()})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-5)
    for name, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], g, rtol=1e-4, atol=1e-5, msg=name)
