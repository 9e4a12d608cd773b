"""ParallelLayout: coordinates, process groups, several layouts in one process, errors; and the
layout-independent initialisation of meshrl.parallel.random (pure, no process group)."""
import pytest
import torch
import torch.distributed as dist

from meshrl.parallel import layout as layout_mod
from meshrl.parallel.layout import LayoutError, ParallelLayout, group_rank, parse_ranks
from meshrl.parallel.random import init_shard_
from meshrl.parallel.sharding import ShardSpec, padded_size, split_range

# ---- pure coordinate arithmetic (virtual layouts: no process group) ------------------------------


def test_coordinates_tp_fastest_then_dp_then_pp_for_an_unusual_order():
    ranks = [5, 3, 7, 1, 0, 6, 2, 4]
    lay = ParallelLayout(ranks=ranks, tp=2, dp=2, pp=2, virtual=True)
    for i, r in enumerate(ranks):
        c = lay.coord_of(r)
        # position i = (pp·dp + dp_idx)·tp + tp_idx
        assert (c.tp, c.dp, c.pp) == (i % 2, (i // 2) % 2, i // 4), (r, c)
        assert lay.rank_at(tp=c.tp, dp=c.dp, pp=c.pp) == r
    assert lay.coord_of(8) is None
    assert lay.tp_ranks_of(dp=1, pp=0) == [7, 1]
    assert lay.dp_ranks_of(tp=1, pp=1) == [6, 4]
    assert lay.pp_ranks_of(tp=0, dp=1) == [7, 2]
    assert lay.mp_ranks_of(dp=0) == [5, 3, 0, 6]
    seen = lay.as_seen_by(2)
    assert (seen.tp_rank, seen.dp_rank, seen.pp_rank) == (0, 1, 1) and seen.is_last_stage
    assert seen.stage_rank(0) == 7


def test_expert_coordinates_carve_ep_from_dp():
    # 16 ranks in an unusual order: tp=2, dp=4 (ep=2, so edp=2), pp=2.
    ranks = [(5 * i + 3) % 16 for i in range(16)]
    lay = ParallelLayout(ranks=ranks, tp=2, dp=4, pp=2, ep=2, virtual=True)
    for i, r in enumerate(ranks):
        c = lay.coord_of(r)
        assert (c.tp, c.dp, c.pp) == (i % 2, (i // 2) % 4, i // 8)
        assert (c.ep, c.edp) == (c.dp % 2, c.dp // 2), (r, c)
    def at(t, d, p):
        return lay.rank_at(tp=t, dp=d, pp=p)

    # ep: consecutive dp indices share out one copy of the experts; edp: same experts, every ep-th.
    assert lay.ep_ranks_of(tp=1, edp=1, pp=0) == [at(1, 2, 0), at(1, 3, 0)]
    assert lay.edp_ranks_of(tp=0, ep=1, pp=1) == [at(0, 1, 1), at(0, 3, 1)]
    assert lay.expert_mp_ranks_of(edp=0) == [at(t, d, p) for p in (0, 1) for d in (0, 1) for t in (0, 1)]
    seen = lay.as_seen_by(at(1, 3, 1))
    assert seen.ep_size == 2 and (seen.ep_rank, seen.edp_rank, seen.dp_rank) == (1, 1, 3)
    # ep=1 (the default): one copy of the experts per replica, edp is dp.
    plain = ParallelLayout(ranks=ranks, tp=2, dp=4, pp=2, virtual=True)
    assert all((plain.coord_of(r).ep, plain.coord_of(r).edp) == (0, plain.coord_of(r).dp) for r in ranks)
    assert plain.edp_ranks_of(tp=0, ep=0, pp=1) == plain.dp_ranks_of(tp=0, pp=1)
    assert plain.expert_mp_ranks_of(edp=2) == plain.mp_ranks_of(dp=2)


def test_parse_ranks_keeps_order():
    assert parse_ranks("3,0-2, 6") == [3, 0, 1, 2, 6]
    assert parse_ranks([2, 1]) == [2, 1]
    assert parse_ranks(4) == [4]


@pytest.mark.parametrize("kwargs, field", [
    (dict(ranks=[0, 1, 2], tp=2), "ranks"),              # 3 ranks, tp·pp·dp = 2
    (dict(ranks=[0, 1, 2, 3], tp=2, pp=1, dp=1), "ranks"),
    (dict(ranks=[0, 1, 1, 2], tp=2, dp=2), "ranks"),     # duplicate
    (dict(ranks=[0, 4], tp=2), "ranks"),                 # outside a world of 4
    (dict(ranks=[-1, 0], tp=2), "ranks"),
    (dict(ranks=[0], tp=0), "tp"),
    (dict(ranks=[0], pp=-1), "pp"),
    (dict(ranks=[0], dp=0), "dp"),
    (dict(ranks=[0], ep=0), "ep"),
    (dict(ranks=[0, 1, 2], dp=3, ep=2), "ep"),         # ep does not divide dp
    (dict(ranks=[0, 1], dp=2, ep=4), "ep"),
])
def test_bad_layouts_stop_with_a_one_line_error_naming_the_field(kwargs, field):
    with pytest.raises(LayoutError) as e:
        ParallelLayout(**kwargs, virtual=True, world_size=4, name="actor_train")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"actor_train.{field}"), msg


def test_ep_not_dividing_dp_names_both():
    with pytest.raises(LayoutError) as e:
        ParallelLayout(ranks=range(6), tp=1, dp=6, ep=4, virtual=True, name="actor_train")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("actor_train.ep=4") and "dp=6" in msg, msg


def test_a_multi_rank_layout_without_torch_distributed_says_so():
    with pytest.raises(LayoutError, match="needs torch.distributed"):
        ParallelLayout(ranks=[0, 1], tp=2, world_size=2)


# ---- process groups in a gloo pool of 4 -------------------------------------------------------


def _ranks(group):
    return None if group is None else dist.get_process_group_ranks(group)


def _view(lay: ParallelLayout) -> dict:
    if not lay.is_member:
        errors = []
        for attr in ("tp_rank", "dp_rank", "pp_rank"):
            try:
                getattr(lay, attr)
            except RuntimeError as e:
                errors.append(str(e))
        return dict(member=False, errors=errors,
                    groups=[lay.tp_group, lay.dp_group, lay.pp_group, lay.mp_group, lay.group])
    me = torch.tensor([float(dist.get_rank())])
    out = dict(member=True, coord=(lay.tp_rank, lay.dp_rank, lay.pp_rank))
    for axis in ("tp", "dp", "pp", "mp", "ends", ""):
        g = getattr(lay, f"{axis}_group" if axis else "group")
        out[f"{axis}_ranks"] = _ranks(g)
        out[f"{axis}_pos"] = group_rank(g)
        if g is not None:  # a collective in this group: who answers, in which order
            parts = [torch.empty_like(me) for _ in range(dist.get_world_size(g))]
            dist.all_gather(parts, me, group=g)
            out[f"{axis}_gather"] = [int(p.item()) for p in parts]
    return out


def _build_layouts_and_report():
    lays = [ParallelLayout(ranks=[3, 1, 2, 0], tp=2, dp=2, name="A"),
            ParallelLayout(ranks=[2, 0], tp=2, name="B"),                 # a subset of the world
            ParallelLayout(ranks=[1, 3, 0, 2], tp=1, dp=2, pp=2, name="C"),
            ParallelLayout(ranks=[3, 1, 2, 0], tp=4, name="D"),
            ParallelLayout(ranks="0-3", tp=2, pp=2, name="E")]
    # All alive at once: use them in an interleaved order after building every one.
    return [_view(lay) for lay in reversed(lays)][::-1]


def test_groups_hold_the_right_ranks_in_layout_order(dist_pool):
    views = dist_pool(4).run(_build_layouts_and_report)
    # Expected per layout: rank -> (coord, tp group, dp group, pp group, mp group, ends group).
    # A group's order is its coordinate order, so group rank == coordinate and collectives
    # (all_gather, a chunk's index) follow the layout, not the sorted global ranks.
    A = {3: ((0, 0, 0), [3, 1], [3, 2], None, [3, 1], None),
         1: ((1, 0, 0), [3, 1], [1, 0], None, [3, 1], None),
         2: ((0, 1, 0), [2, 0], [3, 2], None, [2, 0], None),
         0: ((1, 1, 0), [2, 0], [1, 0], None, [2, 0], None)}
    B = {2: ((0, 0, 0), [2, 0], None, None, [2, 0], None),
         0: ((1, 0, 0), [2, 0], None, None, [2, 0], None)}
    C = {1: ((0, 0, 0), None, [1, 3], [1, 0], [1, 0], [1, 0]),
         3: ((0, 1, 0), None, [1, 3], [3, 2], [3, 2], [3, 2]),
         0: ((0, 0, 1), None, [0, 2], [1, 0], [1, 0], [1, 0]),
         2: ((0, 1, 1), None, [0, 2], [3, 2], [3, 2], [3, 2])}
    D = {r: ((i, 0, 0), [3, 1, 2, 0], None, None, [3, 1, 2, 0], None)
         for i, r in enumerate([3, 1, 2, 0])}
    E = {0: ((0, 0, 0), [0, 1], None, [0, 2], [0, 1, 2, 3], [0, 2]),
         1: ((1, 0, 0), [0, 1], None, [1, 3], [0, 1, 2, 3], [1, 3]),
         2: ((0, 0, 1), [2, 3], None, [0, 2], [0, 1, 2, 3], [0, 2]),
         3: ((1, 0, 1), [2, 3], None, [1, 3], [0, 1, 2, 3], [1, 3])}
    whole = {"A": [3, 1, 2, 0], "B": [2, 0], "C": [1, 3, 0, 2], "D": [3, 1, 2, 0], "E": [0, 1, 2, 3]}
    for li, (name, expect) in enumerate(zip("ABCDE", [A, B, C, D, E])):
        for rank in range(4):
            v = views[rank][li]
            if rank not in expect:
                assert not v["member"], (name, rank)
                assert len(v["errors"]) == 3 and all(f"not in {name}" in e for e in v["errors"])
                assert v["groups"] == [None] * 5
                continue
            coord, tp, dp, pp, mp, ends = expect[rank]
            assert v["member"] and v["coord"] == coord, (name, rank, v["coord"])
            for axis, want, pos in (("tp", tp, coord[0]), ("dp", dp, coord[1]),
                                    ("pp", pp, coord[2]), ("mp", mp, None), ("ends", ends, None),
                                    ("", whole[name], None)):
                assert v[f"{axis}_ranks"] == want, (name, rank, axis, v[f"{axis}_ranks"], want)
                if want is not None:
                    assert v[f"{axis}_gather"] == want, (name, rank, axis)
                    assert v[f"{axis}_pos"] == want.index(rank), (name, rank, axis)
                    if pos is not None:
                        assert v[f"{axis}_pos"] == pos


def _expert_groups_report():
    lays = [ParallelLayout(ranks=[3, 1, 2, 0], dp=4, ep=2, name="A"),
            ParallelLayout(ranks="0-3", tp=2, dp=2, ep=2, name="B"),
            ParallelLayout(ranks=[1, 0, 3, 2], pp=2, dp=2, ep=2, name="C"),
            ParallelLayout(ranks="0-3", tp=2, dp=2, name="D")]  # ep=1
    out = []
    me = torch.tensor([float(dist.get_rank())])
    for lay in lays:
        v = dict(coord=(lay.ep_rank, lay.edp_rank), edp_is_dp=lay.edp_group is lay.dp_group,
                 expert_mp_is_mp=lay.expert_mp_group is lay.mp_group)
        for axis in ("ep", "edp", "expert_mp"):
            g = getattr(lay, f"{axis}_group")
            v[axis] = _ranks(g)
            if g is not None:  # who answers a collective in this group, in which order
                parts = [torch.empty_like(me) for _ in range(dist.get_world_size(g))]
                dist.all_gather(parts, me, group=g)
                v[f"{axis}_gather"] = [int(p.item()) for p in parts]
                v[f"{axis}_pos"] = group_rank(g)
        out.append(v)
    return out


def test_expert_groups_hold_the_right_ranks_in_layout_order(dist_pool):
    views = dist_pool(4).run(_expert_groups_report)
    # rank -> ((ep_rank, edp_rank), ep group, edp group, expert_mp group); a group of one is None.
    A = {3: ((0, 0), [3, 1], [3, 2], [3, 1]), 1: ((1, 0), [3, 1], [1, 0], [3, 1]),
         2: ((0, 1), [2, 0], [3, 2], [2, 0]), 0: ((1, 1), [2, 0], [1, 0], [2, 0])}
    B = {0: ((0, 0), [0, 2], None, [0, 1, 2, 3]), 1: ((0, 0), [1, 3], None, [0, 1, 2, 3]),
         2: ((1, 0), [0, 2], None, [0, 1, 2, 3]), 3: ((1, 0), [1, 3], None, [0, 1, 2, 3])}
    C = {1: ((0, 0), [1, 0], None, [1, 0, 3, 2]), 0: ((1, 0), [1, 0], None, [1, 0, 3, 2]),
         3: ((0, 0), [3, 2], None, [1, 0, 3, 2]), 2: ((1, 0), [3, 2], None, [1, 0, 3, 2])}
    # ep=1: no ep group; the expert groups are the dense ones (dp [r, r±2], mp the tp pair).
    D = {r: ((0, r // 2), None, [r % 2, r % 2 + 2], [r - r % 2, r - r % 2 + 1]) for r in range(4)}
    for li, (name, expect) in enumerate(zip("ABCD", [A, B, C, D])):
        for rank in range(4):
            v, (coord, ep, edp, emp) = views[rank][li], expect[rank]
            assert v["coord"] == coord, (name, rank, v)
            assert (v["ep"], v["edp"], v["expert_mp"]) == (ep, edp, emp), (name, rank, v)
            for axis, want in (("ep", ep), ("edp", edp), ("expert_mp", emp)):
                if want is not None:
                    assert v[f"{axis}_gather"] == want and v[f"{axis}_pos"] == want.index(rank)
            assert v["edp_is_dp"] == v["expert_mp_is_mp"] == (name == "D"), (name, rank)


def _errors_in_a_live_world():
    msgs = []
    for kwargs in (dict(ranks=[0, 4], tp=2), dict(ranks=[2, 2], tp=2), dict(ranks=[0, 1, 2], tp=2)):
        try:
            ParallelLayout(**kwargs, name="critic")
        except LayoutError as e:
            msgs.append(str(e))
    ok = ParallelLayout(ranks=[1, 0], tp=2, name="after")  # the world is still usable
    t = torch.ones(1)
    if ok.is_member:
        dist.all_reduce(t, group=ok.tp_group)
    return msgs, t.item()


def test_layout_errors_in_a_live_world(dist_pool):
    for rank, (msgs, total) in enumerate(dist_pool(4).run(_errors_in_a_live_world)):
        assert len(msgs) == 3
        assert all(m.startswith("critic.ranks") and "\n" not in m for m in msgs), msgs
        assert "outside the world of 4" in msgs[0] and "twice" in msgs[1] and "tp*pp*dp" in msgs[2]
        assert total == (2.0 if rank in (0, 1) else 1.0)


def _order_kept_or_refused():
    """On a torch whose new_group cannot keep the caller's order, a permuted group is refused
    (before any group is built, so every rank stops at the same point) rather than silently
    mis-ordered; a sorted one is built."""
    saved = layout_mod._NEW_GROUP_KEEPS_ORDER
    layout_mod._NEW_GROUP_KEEPS_ORDER = False
    try:
        try:
            ParallelLayout(ranks=[1, 0, 2, 3], tp=2, dp=2, name="gen")
            msg = None
        except LayoutError as e:
            msg = str(e)
        sorted_ok = ParallelLayout(ranks=[1, 3], tp=2, name="gen2")
        return msg, (not sorted_ok.is_member
                     or sorted_ok.tp_rank == group_rank(sorted_ok.tp_group))
    finally:
        layout_mod._NEW_GROUP_KEEPS_ORDER = saved


def test_old_torch_refuses_a_permuted_group_instead_of_misordering(dist_pool):
    for msg, consistent in dist_pool(4).run(_order_kept_or_refused):
        assert msg is not None and msg.startswith("gen.ranks") and "\n" not in msg, msg
        assert consistent


# ---- random.init_shard_: the same full weight from any split ----------------------------------


def _assemble(name, full_shape, dim, tp, seed, std, dtype=torch.float32):
    """Build every rank's shard of a split padded to a multiple of tp; return the full tensor
    (padding stripped) and the padding rows seen."""
    size = full_shape[dim]
    pieces = []
    for r in range(tp):
        start, stop = split_range(padded_size(size, tp), tp, r)
        spec = ShardSpec(name, full_shape, dim, start, stop)
        p = torch.full(spec.local_shape, float("nan"), dtype=dtype)
        pieces.append(init_shard_(p, spec, seed, std))
    cat = torch.cat(pieces, dim)
    return cat.narrow(dim, 0, size), cat.narrow(dim, size, cat.shape[dim] - size)


@pytest.mark.parametrize("full_shape, dim", [((12, 5), 0), ((5, 12), 1), ((10, 6), 0), ((9, 4), 0)])
def test_init_shard_gives_the_same_full_weight_from_any_split(full_shape, dim):
    # (10, 6) and (9, 4) at tp=4: a vocabulary padded to 12 rows, rank 3 of (9, 4) holds padding only
    ref, _ = _assemble("embed.weight", full_shape, dim, 1, seed=7, std=0.5)
    for tp in (2, 4):
        full, pad = _assemble("embed.weight", full_shape, dim, tp, seed=7, std=0.5)
        assert torch.equal(full, ref), tp  # same generator draws: bitwise
        assert torch.count_nonzero(pad) == 0 and not pad.isnan().any()
    other_seed, _ = _assemble("embed.weight", full_shape, dim, 2, seed=8, std=0.5)
    other_name, _ = _assemble("lm_head.weight", full_shape, dim, 2, seed=7, std=0.5)
    assert not torch.equal(other_seed, ref) and not torch.equal(other_name, ref)
    bf16, _ = _assemble("embed.weight", full_shape, dim, 4, seed=7, std=0.5, dtype=torch.bfloat16)
    assert torch.equal(bf16, ref.to(torch.bfloat16))  # drawn in fp32, cast once


def test_init_shard_replicated_and_distribution():
    spec = ShardSpec("norm.weight", (64, 64))
    a = init_shard_(torch.empty(64, 64), spec, seed=3, std=0.02)
    b = init_shard_(torch.empty(64, 64), spec, seed=3, std=0.02)
    assert torch.equal(a, b)
    # 4096 N(0, 0.02²) draws: the sample std is within ±5% (about 4.5 standard errors) and the
    # mean within 5 standard errors of 0.
    assert abs(a.std().item() / 0.02 - 1) < 0.05
    assert abs(a.mean().item()) < 5 * 0.02 / 64
    split, _ = _assemble("norm.weight", (64, 64), 0, 4, seed=3, std=0.02)
    assert split.shape == a.shape and abs(split.std().item() / 0.02 - 1) < 0.05
