"""DistributedOptimizer with expert parallelism on gloo: expert grads are summed over edp (not dp),
their copies counted over one copy of every expert, ZeRO-1 shards their state over edp; every rank's
params equal torch.optim.AdamW on the whole model with the summed grads and one clipping coefficient;
the global norm counts every element once; ep=1 is exactly the path without experts; a DCP round trip
keeps expert state apart per ep rank."""
import zlib

import pytest
import torch
from torch import nn

from meshrl.parallel.data_parallel import DistributedOptimizer
from meshrl.parallel.layout import ParallelLayout
from meshrl.parallel.sharding import ShardSpec, split_range
from tests.parallel.test_data_parallel import LR, SMALL_BUCKET_MB, WD, torch_adamw

MAX_NORM = 1.0
E = 4  # experts


# ---- a toy MoE model: dense params on every dp rank, each expert on the ranks of one ep index ------
def full_model():
    """Full tensors: a replicated matrix and norm, a tp-split matrix, and per expert a tp-split
    matrix and a tp-replicated bias."""
    g = torch.Generator().manual_seed(3)
    full = {"embed.w": torch.randn(8, 6, generator=g), "norm": torch.randn(6, generator=g),
            "attn.w": torch.randn(8, 6, generator=g)}
    for j in range(E):
        full[f"experts.{j}.w"] = torch.randn(6, 4, generator=g)
        full[f"experts.{j}.b"] = torch.randn(4, generator=g)
    return full


FULL_SHAPES = {n: tuple(t.shape) for n, t in full_model().items()}


def is_expert(name):
    return name.startswith("experts.")


def rank_specs(layout):
    """This rank's ShardSpecs. With pp=2 the first stage holds no experts at all."""
    tp, t = layout.tp_size, layout.tp_rank

    def split(name):
        return ShardSpec(name, FULL_SHAPES[name], 0, *split_range(FULL_SHAPES[name][0], tp, t))

    first = [ShardSpec("embed.w", (8, 6)), split("attn.w")]
    last = [ShardSpec("norm", (6,))]
    per_rank = E // layout.ep_size
    for j in range(layout.ep_rank * per_rank, (layout.ep_rank + 1) * per_rank):
        last += [split(f"experts.{j}.w"), ShardSpec(f"experts.{j}.b", (4,))]
    if layout.pp_size == 1:
        return first + last
    return first if layout.is_first_stage else last


def rank_grad(dp_rank, name, step):
    """The full-shape grad dp rank ``dp_rank`` produces for ``name``: seeded by all three (crc32, not
    hash(): the same in every process)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{dp_rank}/{name}/{step}".encode()))
    return torch.randn(FULL_SHAPES[name], generator=g)


def summed_grad(name, step, dp, ep):
    """What the reduction must produce: a dense grad summed over every dp rank, an expert's over the
    dp ranks holding it (those whose ep index owns expert j)."""
    if not is_expert(name):
        return sum(rank_grad(d, name, step) for d in range(dp))
    owner = int(name.split(".")[1]) // (E // ep)
    return sum(rank_grad(d, name, step) for d in range(dp) if d % ep == owner)


def build(layout, *, flag=True, **kw):
    full = full_model()
    named = []
    for spec in rank_specs(layout):
        p = nn.Parameter(spec.slice_full(full[spec.name]).clone())
        p.shard_spec = spec
        if flag and is_expert(spec.name):
            p.expert_parallel = True
        named.append((spec.name, p))
    opt = DistributedOptimizer(named, layout, lr=LR, weight_decay=WD, bucket_mb=SMALL_BUCKET_MB,
                               max_grad_norm=MAX_NORM, **kw)
    return named, opt


def set_grads(named, layout, step):
    """Through autograd, so the buffers' hooks (and with overlap, their launches) see them."""
    loss = sum((p * p.shard_spec.slice_full(rank_grad(layout.dp_rank, name, step))).sum()
               for name, p in named)
    loss.backward()


def run_steps(named, opt, layout, steps, first=0):
    norms = []
    for step in range(first, first + steps):
        opt.zero_grad()
        set_grads(named, layout, step)
        info = opt.step()
        assert not info["skipped"]
        norms.append(info["grad_norm"])
    return norms


STEPS = 3


def _adamw_case(tp, pp, dp, ep, zero1, overlap):
    layout = ParallelLayout(ranks=list(range(tp * pp * dp)), tp=tp, pp=pp, dp=dp, ep=ep)
    named, opt = build(layout, zero1=zero1, overlap=overlap)
    norms = run_steps(named, opt, layout, STEPS)
    names = sorted(FULL_SHAPES)
    full = full_model()
    ref = [nn.Parameter(full[n].clone()) for n in names]
    ref_norms = torch_adamw(ref, lambda ps, step: [summed_grad(n, step, dp, ep) for n in names],
                            STEPS, MAX_NORM)
    ref = dict(zip(names, ref))
    param_err = max((p.detach() - p.shard_spec.slice_full(ref[n].detach())).abs().max().item()
                    for n, p in named)
    expert_numel = sum(p.numel() for n, p in named if is_expert(n))
    return {"norms": norms, "ref_norms": ref_norms, "param_err": param_err,
            "expert_numel": expert_numel,
            "expert_state": 0 if opt.expert is None else opt.expert.master.numel()}


CASES = [(1, 1, 2, 2), (1, 1, 4, 2), (2, 1, 2, 2), (1, 2, 2, 2), (1, 1, 4, 4)]  # (tp, pp, dp, ep)


@pytest.mark.parametrize("zero1, overlap", [(False, False), (True, False), (True, True)])
def test_expert_grads_sum_over_edp_and_adamw_matches_single_process(dist_pool, zero1, overlap):
    for tp, pp, dp, ep in CASES:
        results = dist_pool(tp * pp * dp).run(_adamw_case, tp, pp, dp, ep, zero1, overlap)
        for rank, r in enumerate(results):
            case = ((tp, pp, dp, ep), rank, r)
            assert min(r["ref_norms"]) > MAX_NORM, case  # clipping is active in every step
            # fp32 sums of a few hundred squares in another order: relative 1e-6.
            for got, want in zip(r["norms"], r["ref_norms"]):
                assert abs(got - want) <= 1e-6 * want, case
            assert r["param_err"] < 1e-6, case
            if r["expert_numel"] and zero1 and dp // ep > 1:
                # ZeRO-1 over edp: about 1/edp of the expert elements (plus bucket padding).
                assert r["expert_state"] < r["expert_numel"] * 0.75, case


# ---- ep=1: the path without experts, exactly ------------------------------------------------------
def _ep1_case(tp, dp, zero1):
    out = {}
    for flag in (False, True):
        layout = ParallelLayout(ranks=list(range(tp * dp)), tp=tp, dp=dp, ep=1)
        named, opt = build(layout, flag=flag, zero1=zero1)
        norms = run_steps(named, opt, layout, STEPS)
        out[flag] = {"norms": norms, "params": [p.detach().clone() for _, p in named],
                     "master": opt.master.clone(), "keys": sorted(opt.state_dict()),
                     "parts": len(opt._parts), "buckets": len(opt.grads.buckets)}
        opt.close()
    return out


@pytest.mark.parametrize("zero1", [False, True])
def test_ep1_is_the_path_without_experts(dist_pool, zero1):
    for tp, dp in ((1, 4), (2, 2)):
        for rank, r in enumerate(dist_pool(4).run(_ep1_case, tp, dp, zero1)):
            plain, flagged = r[False], r[True]
            assert flagged["parts"] == plain["parts"] == 1 and flagged["buckets"] == plain["buckets"]
            assert flagged["norms"] == plain["norms"]  # bitwise: the same buffer, the same collectives
            assert all(torch.equal(a, b) for a, b in zip(flagged["params"], plain["params"]))
            assert torch.equal(flagged["master"], plain["master"])
            # The checkpoint keys of a model without experts, as before ep existed.
            d, t = rank // tp, rank % tp
            want = (f"zero1_tp{t}of{tp}_pp0of1_dp{d}of{dp}" if zero1 else f"dp_tp{t}of{tp}_pp0of1")
            assert flagged["keys"] == plain["keys"] == [want], (rank, flagged["keys"])


# ---- checkpoint --------------------------------------------------------------------------------
def _dcp_case(path, pp, zero1):
    import torch.distributed.checkpoint as dcp  # imported here: it is slow to import in every worker

    layout = ParallelLayout(ranks=[0, 1, 2, 3], tp=1, pp=pp, dp=4 // pp, ep=2)
    named, opt = build(layout, zero1=zero1)
    run_steps(named, opt, layout, 1)
    snapshot = [p.detach().clone() for _, p in named]
    opt.offload()
    keys = sorted(opt.state_dict())
    dcp.save(opt.state_dict(), checkpoint_id=path)
    opt.reload()
    run_steps(named, opt, layout, 1, first=1)
    # A fresh optimizer over params restored to the checkpoint's step resumes identically.
    named2, opt2 = build(layout, zero1=zero1)
    with torch.no_grad():
        for (_, p), s in zip(named2, snapshot):
            p.copy_(s)
    state = opt2.state_dict()
    dcp.load(state, checkpoint_id=path)
    try:  # expert state is not optional where this rank holds experts
        opt2.load_state_dict({k: v for k, v in state.items() if not k.startswith("expert_")})
        missing = None
    except KeyError as e:
        missing = str(e)
    opt2.load_state_dict(state)
    restored_step = opt2.step_count
    run_steps(named2, opt2, layout, 1, first=1)
    parts = [(opt.dense, opt2.dense), (opt.expert, opt2.expert)]
    return {"keys": keys, "missing": missing, "step": restored_step,
            "params_equal": all(torch.equal(p, q) for (_, p), (_, q) in zip(named, named2)),
            "state_equal": all(torch.equal(getattr(a, k), getattr(b, k)) for a, b in parts
                               for k in ("master", "exp_avg", "exp_avg_sq"))}


@pytest.mark.parametrize("zero1", [False, True])
@pytest.mark.parametrize("pp", [1, 2])
def test_dcp_round_trip_keeps_expert_state_per_ep_rank(dist_pool, tmp_path, pp, zero1):
    dp = 4 // pp
    for rank, r in enumerate(dist_pool(4).run(_dcp_case, str(tmp_path / "ckpt"), pp, zero1)):
        assert (r["step"], r["params_equal"], r["state_equal"]) == (1, True, True), (rank, r)
        d, p = rank % dp, rank // dp
        experts_here = pp == 1 or p == 1  # with pp=2 the first stage holds no experts
        mode = "zero1" if zero1 else "dp"
        want = [f"{mode}_tp0of1_pp{p}of{pp}" + (f"_dp{d}of{dp}" if zero1 else "")]
        if experts_here:
            edp = dp // 2
            want.append(f"expert_{mode}_tp0of1_pp{p}of{pp}_ep{d % 2}of2"
                        + (f"_edp{d // 2}of{edp}" if zero1 and edp > 1 else ""))
        assert r["keys"] == sorted(want), (rank, r["keys"])
        assert (r["missing"] is not None) == experts_here, (rank, r["missing"])
        if experts_here:
            assert want[1] in r["missing"]
