"""meshrl's model reproduces transformers' logits in every layout (tp, pp, dp), and its gradients under
tensor parallelism (with and without sequence parallelism, K/V heads replicated), for Llama (3.1-style
rope scaling; 3.2 with tied embeddings), Mistral, Qwen2 and Qwen3 (q/k norms, head_dim of its own)."""
import pytest
import torch

from meshrl.engine.generation import stage_pass
from meshrl.engine.model import PackedMeta, build_stage
from meshrl.parallel import mappings
from meshrl.parallel.layout import ParallelLayout
from meshrl.testing.tiny_models import make_tiny_hf

KINDS = ["llama", "mistral", "qwen2", "qwen3", "llama3.2"]
LENGTHS = [5, 40, 1, 17]  # 40 > mistral's window of 16 and llama3 rope's original 32 positions
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2), (2, 2, 2), (4, 1, 1)]
# fp32 end to end; the only differences from transformers are summation orders (tp all-reduce,
# per-sequence vs batched attention). With the tiny models' 0.2 init (logits up to |6.4|, attention
# far from uniform) the measured max |diff| over all kinds, layouts and sequences is 1.22e-5
# (qwen2 at tp=2; llama 1.14e-5, mistral 1.06e-5): about 25 fp32 ulps of the largest logit after
# 4 layers. 2e-5 leaves room for another CPU's BLAS; a rope-scaling bug moves logits by 0.1-1.3.
ATOL = 2e-5


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return reference_models(tmp_path_factory, KINDS)


def reference_models(tmp_path_factory, kinds, lengths=LENGTHS):
    """kind -> (tiny model path, token ids of ``lengths``, transformers' logits for each)."""
    import transformers
    out = {}
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 101, (n,), generator=g) for n in lengths]
    for kind in kinds:
        path = make_tiny_hf(kind, str(tmp_path_factory.mktemp(kind)), seed=1)
        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            ref = [model(x[None]).logits[0] for x in ids]
        out[kind] = (path, ids, ref)
    return out


def _replica_logits(path, ids, tp, pp, dp, ep=1):
    """Run on every rank; the last stage's tp rank 0 of each dp replica returns
    {sequence index: logits}. Replica d takes sequences d, d+dp, ..."""
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout = ParallelLayout(ranks=list(range(world)), tp=tp, pp=pp, dp=dp, ep=ep)
    stage = build_stage(layout, model_dir=path)
    mine = list(range(layout.dp_rank, len(ids), dp))
    seqs = [ids[i] for i in mine]
    meta = PackedMeta.from_lengths([len(s) for s in seqs])
    with torch.no_grad():
        h = stage_pass(stage, torch.cat(seqs), meta)
        if h is None:
            return None
        logits = mappings.all_gather_dim(stage.logits(h), -1, layout.tp_group)[:, :101]
    if layout.tp_rank != 0:
        return None
    cu = meta.cu_seqlens.tolist()
    return {i: logits[cu[j]:cu[j + 1]] for j, i in enumerate(mine)}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "tp%d-pp%d-dp%d" % l)
def test_logits_match_transformers(dist_pool, tiny_models, layout):
    check_logits(dist_pool, tiny_models, KINDS, layout)


def check_logits(dist_pool, models, kinds, layout):
    """Every sequence's logits, from whichever replica ran it, equal transformers' (``models``:
    kind -> (path, ids, reference logits)); ``layout`` (tp, pp, dp[, ep])."""
    world = layout[0] * layout[1] * layout[2]
    for kind in kinds:
        path, ids, ref = models[kind]
        if world == 1:
            results = [_replica_logits(path, ids, *layout)]
        else:
            results = dist_pool(world).run(_replica_logits, path, ids, *layout)
        got = {}
        for r in results:
            if r:
                got.update(r)
        assert sorted(got) == list(range(len(ids))), f"{kind}: sequences missing"
        for i, logits in got.items():
            err = (logits - ref[i]).abs().max().item()
            assert err <= ATOL, f"{kind} {layout} sequence {i}: max abs diff {err}"


GRAD_LENGTHS = [5, 40, 1, 18]  # 64 tokens: sequence parallelism splits them over tp
# gradients of a weighted logit sum, fp32: summation orders only (measured max |diff| 3.6e-4 of
# gradients up to ~50); a missing or doubled tp collective changes them by O(1)
GRAD_RTOL, GRAD_ATOL = 1e-3, 1e-3


def _replica_grads(path, ids, tp, sp, seed):
    """Run on every rank: the weighted logit sum's gradient of this rank's shards, by HF name."""
    import torch.distributed as dist
    from meshrl.parallel.layers import sync_tp_partial_grads
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout = ParallelLayout(ranks=list(range(world)), tp=tp, pp=1, dp=1)
    stage = build_stage(layout, model_dir=path, sequence_parallel=sp)
    meta = PackedMeta.from_lengths([len(s) for s in ids])
    calls, all_reduce = [], dist.all_reduce

    def counted(*args, **kwargs):
        calls.append(1)
        return all_reduce(*args, **kwargs)
    dist.all_reduce = counted  # the pass's all-reduces (gloo runs reduce-scatters as all-reduces)
    try:
        h = stage(torch.cat(ids), meta)
        logits = mappings.gather_from_tp(stage.logits(h), layout.tp_group)[:, :101]
        w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
        (logits * w).sum().backward()
    finally:
        dist.all_reduce = all_reduce
    sync_tp_partial_grads(list(stage.parameters()), layout.tp_group)
    return len(calls), {p.shard_spec.name: (p.shard_spec, p.grad.clone()) for p in stage.parameters()}


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, False)],
                         ids=["tp2", "tp2-sequence-parallel", "tp4-replicated-kv"])
def test_gradients_match_transformers(dist_pool, tiny_models, tp, sp):
    """Every tensor-parallel shard's gradient equals transformers' gradient of the same loss, sliced
    as its ShardSpec says, with one collective per shared linear input (q, k, v enter once; gate
    and up once), as many as the cost model prices."""
    import transformers
    g = torch.Generator().manual_seed(3)
    for kind in ("llama", "qwen2", "qwen3"):  # qwen3: the q/k norms' partial sums over tp
        path = tiny_models[kind][0]
        ids = [torch.randint(0, 101, (n,), generator=g) for n in GRAD_LENGTHS]
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        logits = torch.cat([model(x[None]).logits[0] for x in ids])
        w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(11))
        (logits * w).sum().backward()
        ref = {n: p.grad for n, p in model.named_parameters()}
        results = dist_pool(tp).run(_replica_grads, path, ids, tp, sp, 11)
        if not sp:  # per layer: attention's and the MLP's output sums forward, their shared
            # inputs' gradient sums backward (what the cost model prices); plus the vocabulary-
            # parallel embedding's sum forward and the LM head input's gradient sum backward
            layers = model.config.num_hidden_layers
            assert [n for n, _ in results] == [4 * layers + 2] * tp, (kind, tp, results[0][0])
        for _, shards in results:
            for name, (spec, grad) in shards.items():
                assert_shard_close(grad, spec, ref[name], f"{kind} tp={tp} sp={sp} {name}")


def assert_shard_close(grad, spec, full, where: str):
    """A shard's gradient equals the full gradient's slice its ShardSpec names (padding cut)."""
    if spec.dim is not None:
        stop = min(spec.stop, full.shape[spec.dim])
        full = full.narrow(spec.dim, spec.start, stop - spec.start)
        grad = grad.narrow(spec.dim, 0, stop - spec.start)
    torch.testing.assert_close(grad, full, rtol=GRAD_RTOL, atol=GRAD_ATOL,
                               msg=lambda m: f"{where}: {m}")
