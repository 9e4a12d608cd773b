"""Loss normalisation (DESIGN.md): for every loss aggregation, the actor's gradient does not depend
on how the optimizer step's batch is split — one microbatch, several, two data-parallel ranks or two
pipeline stages give every parameter the same gradient (1e-6 absolute with float64 weights and the
Trainer's fp32 grad buffer; 1e-5 of each parameter's largest gradient with fp32 weights — below).

The batch is a crafted rollout: 8 responses of different lengths behind prompts of different
lengths, packed by ``runtime.rollout.microbatches`` with token fields old_logp, advantages, ref_logp
and ``counted`` (one response left out, as the overlong filter does). The old log-probs are the
model's own (at T = 0.7) shifted by chosen log-ratios, so the clip, clip-higher, the dual-clip cap
and GSPO's sequence clip are all active somewhere; the normalisers come from
``global_token_count``/``global_seq_count`` over the layout, as ``PolicyGradient.train`` does.
The Trainer runs its real step with lr = 0 and no clipping, and its flat buffer's ``main_grad``
(the dp-summed, tied-embedding-synced gradient the optimizer would use) is compared.

Two tiers. With float64 weights (the Trainer's grad buffer stays fp32) the splits agree within
1e-6 absolute: what is left is the fp32 buffer's own rounding (≤ 1 ulp of the largest gradient,
4.8e-7 at |g| = 4.2, measured). With fp32 weights the forward itself is not split-invariant — the
same sequences packed one per microbatch or all in one give log-probs that differ by up to 1.9e-6
(CPU matmul kernels round differently for different row counts, measured) — and backprop through
two layers carries that to gradients differing by up to 3.4e-6 of the parameter's largest gradient
element (measured over splits into 2, 4 and 8 microbatches, dp2 and pp2): the fp32 tier allows
1e-5 of it. A wrong normaliser (a local count for a
global one) moves gradients by 1e-1 relative or more, far above either.
"""
import math

import pytest
import torch

from meshrl.engine.algorithms.calls import logprobs_call, policy_call
from meshrl.engine.algorithms.policy_losses import AGGREGATIONS, LossCounts
from meshrl.engine.batch import split_even
from meshrl.engine.model import ModelConfig, build_stage
from meshrl.engine.runtime.rollout import Rollout, microbatches
from meshrl.engine.train import (OptimConfig, Trainer, global_seq_count, global_token_count,
                                 infer)
from meshrl.parallel.layout import ParallelLayout

TEMPERATURE = 0.7
NORM_LEN = 16.0
EPS_LOW, EPS_HIGH, C = 0.2, 0.28, 3.0
PROMPT_LENS = [3, 5, 2, 7, 4, 6, 3, 5]
RESPONSE_LENS = [4, 9, 3, 6, 7, 2, 5, 8]
NOT_COUNTED = 5  # the response the overlong filter leaves out

# (policy loss, aggregation, extra policy_call arguments)
CASES = [("clip", agg, {}) for agg in AGGREGATIONS] + [
    ("gspo", "token-mean", {}),
    ("dual_clip", "token-mean", {}),
    ("clip", "seq-mean-token-sum-norm", {"kl_coef": 0.1, "entropy_coef": 0.01}),
]
CASE_IDS = [f"{k}-{a}" + ("-kl-entropy" if kw else "") for k, a, kw in CASES]
# name -> (microbatch token budget, tp, pp, dp)
LAYOUTS = {"one": (10**6, 1, 1, 1), "many": (22, 1, 1, 1), "dp2": (20, 1, 1, 2),
           "pp2": (20, 1, 2, 1)}
DTYPES = (torch.float64, torch.float32)


def _config():
    return ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True)


def _stage(layout, dtype=torch.float32):
    # std 0.2: logits of a few units, so log-probs, entropies and ratios are far from uniform
    return build_stage(layout, config=_config(), seed=7, init_std=0.2, dtype=dtype)


def _rollout(data, fields=True):
    n = len(data["prompts"])
    roll = Rollout(data["prompts"], data["responses"], [[0.0] * len(r) for r in data["responses"]],
                   ["eos"] * n, [{}] * n)
    keys = ("old_logp", "advantages", "ref_logp", "counted") if fields else ()
    return roll, {k: data[k] for k in keys}


def _crafted_batch():
    """Token ids, advantages and log-ratios; old/ref log-probs from the model's own log-probs."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 101, (p,), generator=g).tolist() for p in PROMPT_LENS]
    responses = [torch.randint(3, 101, (r,), generator=g).tolist() for r in RESPONSE_LENS]
    data = {"prompts": prompts, "responses": responses}
    roll, _ = _rollout(data, fields=False)
    stage = _stage(ParallelLayout(ranks=[0]))
    mbs = microbatches(roll, list(range(len(roll))), 10**6)
    (lp,) = infer(stage, mbs, logprobs_call(TEMPERATURE))
    cu = mbs[0].meta.cu_seqlens.tolist()
    cur = [lp[cu[b] + p - 1:cu[b] + p - 1 + r].tolist()
           for b, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS))]
    old, adv, ref, counted = [], [], [], []
    for b, r in enumerate(RESPONSE_LENS):
        # log ρ = logp − old: mostly small, every third action 1.3 (ρ 3.7: above the dual-clip cap c = 3
        # for a negative advantage); advantages per response ± a per-token wobble (KL-in-reward-like)
        log_ratio = 0.3 * torch.randn(r, generator=g)
        log_ratio[::3] = 1.3 if b % 2 else -0.4
        a = float(torch.randn((), generator=g)) + 0.2 * torch.randn(r, generator=g)
        old.append([c - d for c, d in zip(cur[b], log_ratio.tolist())])
        adv.append(a.tolist())
        ref.append([c + 0.5 * float(torch.randn((), generator=g)) for c in cur[b]])
        counted.append([0.0 if b == NOT_COUNTED else 1.0] * r)
        # no ratio (token or GSPO sequence) within 1e-3 of a clip or cap boundary, where round-off
        # between layouts (~1e-6 on log ρ) could flip a branch
        bounds = [math.log(x) for x in (1 - EPS_LOW, 1 + EPS_HIGH, C)]
        for x in log_ratio.tolist() + [float(log_ratio.mean())]:
            assert min(abs(x - bd) for bd in bounds) > 1e-3, (b, x)
    data.update(old_logp=old, advantages=adv, ref_logp=ref, counted=counted)
    return data


def run_layout(data, name, dtype=torch.float32):
    """Every case of CASES through ``Trainer.step`` in layout ``name`` with weights of ``dtype``
    -> per case (metrics, {param name: gradient}). Runs on every rank of the layout."""
    import torch.distributed as dist
    max_tokens, tp, pp, dp = LAYOUTS[name]
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout = ParallelLayout(ranks=list(range(world)), tp=tp, pp=pp, dp=dp)
    stage = _stage(layout, dtype)
    before = {p.shard_spec.name: p.detach().clone() for p in stage.parameters()}
    # lr 0, no weight decay and no clipping: the step leaves the weights and main_grad untouched
    trainer = Trainer(stage, OptimConfig(lr=0.0, weight_decay=0.0, max_grad_norm=None, zero1=False))
    roll, fields = _rollout(data)
    mine = split_even(list(range(len(roll))), dp)[layout.dp_rank]
    mbs = microbatches(roll, mine, max_tokens, fields)
    counts = LossCounts(tokens=max(global_token_count(mbs, layout, "action_mask"), 1.0),
                        seqs=max(global_seq_count(mbs, layout, "action_mask"), 1.0),
                        norm_len=NORM_LEN)
    out = []
    for kind, agg, extra in CASES:
        fn = policy_call(counts, kind=kind, agg=agg, temperature=TEMPERATURE, clip_eps_low=EPS_LOW,
                         clip_eps_high=EPS_HIGH, clip_ratio_c=C, **extra)
        metrics = trainer.step(mbs, fn)
        grads = {p.shard_spec.name: p.main_grad.detach().clone() for p in stage.parameters()}
        out.append((metrics, grads))
    for p in stage.parameters():
        assert torch.equal(p.detach(), before[p.shard_spec.name]), p.shard_spec.name
    return {"num_microbatches": len(mbs), "counts": counts, "cases": out}


def run_layouts(data, name):
    return {dtype: run_layout(data, name, dtype) for dtype in DTYPES}


@pytest.fixture(scope="module")
def reference():
    data = _crafted_batch()
    refs = run_layouts(data, "one")
    for dtype, ref in refs.items():
        assert ref["num_microbatches"] == 1
        # 8 responses, one not counted; its actions are not counted either
        assert ref["counts"].seqs == 7.0
        assert ref["counts"].tokens == sum(RESPONSE_LENS) - RESPONSE_LENS[NOT_COUNTED]
        by_id = dict(zip(CASE_IDS, ref["cases"]))
        for cid, (m, grads) in by_id.items():
            # each objective's branches are exercised, and every parameter gets a gradient
            assert m["clip_frac"] > 0.05 and m["ratio_out_frac"] > m["clip_frac"], (cid, m)
            assert all(g.abs().max() > 1e-3 for g in grads.values()), cid
        assert by_id["dual_clip-token-mean"][0]["clip_frac_lower"] > 0.05
        assert by_id["clip-seq-mean-token-sum-norm-kl-entropy"][0]["kl"] > 0.01
        # the modes' gradients differ by far more than the tolerances below
        g = [by_id[f"clip-{a}"][1]["model.embed_tokens.weight"] for a in AGGREGATIONS]
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                assert (g[i] - g[j]).abs().max() > 1e-2 * g[i].abs().max()
    return data, refs


def grad_diffs(ref, result):
    """Per case: (max over parameters of |Δgrad|, max over parameters of |Δgrad| / max|grad_ref|
    of that parameter, max over the step's metrics of |Δ|/max(1, |value|)) against the reference."""
    out = []
    for (m, grads), (rm, rgrads) in zip(result["cases"], ref["cases"]):
        assert set(m) == set(rm)
        d = {n: (grads[n] - rgrads[n]).abs().max().item() for n in grads}
        rel = max(d[n] / rgrads[n].abs().max().item() for n in grads)
        dm = max(abs(m[k] - rm[k]) / max(1.0, abs(rm[k])) for k in rm)
        out.append((max(d.values()), rel, dm))
    return out


def _check(refs, results, name):
    for rank, per_dtype in enumerate(results):
        for dtype, res in per_dtype.items():
            ref = refs[dtype]
            assert res["counts"] == ref["counts"], (name, rank)  # global, not this rank's share
            for cid, (diff, rel, dmetric) in zip(CASE_IDS, grad_diffs(ref, res)):
                what = (name, rank, str(dtype), cid, diff, rel, dmetric)
                if dtype == torch.float64:
                    # only the fp32 grad buffer's rounding is left (≤ 1 ulp of |g| ≤ 4.2: 4.8e-7)
                    assert diff <= 1e-6, what
                else:
                    # fp32 forward round-off differs between packings (module docstring):
                    # measured ≤ 3.4e-6 of each parameter's largest gradient element
                    assert rel <= 1e-5, what
                # metrics (loss, clip fractions, KL, entropy, grad norm): fp32 sums over
                # microbatches and ranks of per-microbatch shares; measured ≤ 6.5e-7 relative
                assert dmetric <= 2e-6, what


def test_several_microbatches_match_one(reference):
    data, refs = reference
    res = run_layouts(data, "many")
    assert res[torch.float32]["num_microbatches"] >= 3
    _check(refs, [res], "many")


@pytest.mark.parametrize("name", ["dp2", "pp2"])
def test_two_ranks_match_one_microbatch(dist_pool, reference, name):
    data, refs = reference
    results = dist_pool(2).run(run_layouts, data, name)
    # dp2: each rank's half in 2+ microbatches; pp2: the 1F1B schedule over 3+ microbatches
    assert all(r[torch.float32]["num_microbatches"] >= 2 for r in results)
    if name == "pp2":  # each stage holds its own layers; together (the tied matrix on both) all
        names = set(results[0][torch.float32]["cases"][0][1]) | \
            set(results[1][torch.float32]["cases"][0][1])
        assert names == set(refs[torch.float32]["cases"][0][1])
        assert results[0][torch.float32]["num_microbatches"] >= 3
    _check(refs, results, name)
