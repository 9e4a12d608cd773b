"""Each conjugate pair of meshrl.parallel.mappings, forward and backward, against the unsharded
computation, on gloo tp groups of 2 and 4 (two tp=2 groups side by side in a pool of 4, and groups
whose layout order is not ascending global rank)."""
import zlib

import pytest
import torch

from meshrl.parallel import mappings
from meshrl.parallel.layout import ParallelLayout

# Scatter and gather only move data: compared bit for bit. Reductions add ≤ 4 fp32 terms of size
# ~1 in an order gloo chooses: a few ulp (1e-7 each), so 1e-6 absolute and relative.
SUM_TOL = dict(rtol=1e-6, atol=1e-6)

LAYOUTS = [
    pytest.param(dict(ranks=[0, 1, 2, 3], tp=2, dp=2), id="tp2x2"),
    pytest.param(dict(ranks=[3, 1, 2, 0], tp=2, dp=2), id="tp2x2-permuted"),
    pytest.param(dict(ranks=[3, 1, 2, 0], tp=4), id="tp4-permuted"),
]


def _data(key, i, shape):
    """Tensor number ``i`` of family ``key``: every rank can rebuild every other rank's data."""
    # crc32, not hash(): string hashes differ between the spawned worker processes
    g = torch.Generator().manual_seed(zlib.crc32(repr((key, i)).encode()))
    return torch.randn(shape, generator=g)


def _check_all_mappings(kwargs):
    lay = ParallelLayout(**kwargs)
    G, n, i, d = lay.tp_group, lay.tp_size, lay.tp_rank, lay.dp_rank
    eq = torch.testing.assert_close
    exact = dict(rtol=0, atol=0)

    def fam(name):  # per-(dp replica, rank) data; replicas differ so groups cannot mix silently
        return lambda j, shape: _data((name, d), j, shape)

    # copy ↔ reduce. copy: identity forward, upstream gradients summed backward.
    X, g = fam("copy_x"), fam("copy_g")
    x = X(0, (5, 6)).requires_grad_()
    y = mappings.copy_to_tp(x, G)
    eq(y, X(0, (5, 6)), **exact)
    y.backward(g(i, (5, 6)))
    eq(x.grad, sum(g(j, (5, 6)) for j in range(n)), **SUM_TOL)

    # reduce: sum forward (input untouched), identity backward.
    X, g = fam("red_x"), fam("red_g")
    x = X(i, (5, 6)).requires_grad_()
    y = mappings.reduce_from_tp(x, G)
    eq(y, sum(X(j, (5, 6)) for j in range(n)), **SUM_TOL)
    eq(x.detach(), X(i, (5, 6)), **exact)
    y.backward(g(0, (5, 6)))
    eq(x.grad, g(0, (5, 6)), **exact)

    # scatter ↔ gather along the last (feature) dim; this rank's piece is its tp_rank'th.
    X, g = fam("sc_x"), fam("sc_g")
    x = X(0, (3, 4 * n)).requires_grad_()
    y = mappings.scatter_to_tp(x, G)
    eq(y, X(0, (3, 4 * n))[:, 4 * i:4 * (i + 1)], **exact)
    y.backward(g(i, (3, 4)))
    eq(x.grad, torch.cat([g(j, (3, 4)) for j in range(n)], -1), **exact)

    X, g = fam("ga_x"), fam("ga_g")
    x = X(i, (4, 3)).t().requires_grad_()  # a non-contiguous input [3, 4]
    y = mappings.gather_from_tp(x, G)
    eq(y, torch.cat([X(j, (4, 3)).t() for j in range(n)], -1), **exact)
    y.backward(g(0, (3, 4 * n)))
    eq(x.grad, g(0, (3, 4 * n))[:, 4 * i:4 * (i + 1)], **exact)

    # Sequence parallel: scatter ↔ gather along tokens (dim 0).
    X, g = fam("ss_x"), fam("ss_g")
    x = X(0, (2 * n, 5)).requires_grad_()
    y = mappings.scatter_to_sequence(x, G)
    eq(y, X(0, (2 * n, 5))[2 * i:2 * (i + 1)], **exact)
    y.backward(g(i, (2, 5)))
    eq(x.grad, torch.cat([g(j, (2, 5)) for j in range(n)], 0), **exact)

    # gather feeding a tp-parallel consumer: upstream gradients are partial sums, reduce-scattered.
    X, g = fam("gs_x"), fam("gs_g")
    x = X(i, (2, 5)).requires_grad_()
    y = mappings.gather_from_sequence(x, G)
    eq(y, torch.cat([X(j, (2, 5)) for j in range(n)], 0), **exact)
    y.backward(g(i, (2 * n, 5)))
    eq(x.grad, sum(g(j, (2 * n, 5)) for j in range(n))[2 * i:2 * (i + 1)], **SUM_TOL)

    # gather feeding a replicated consumer (value head): the same upstream gradient on every rank,
    # of which this rank keeps its piece (a reduce-scatter would scale it by n).
    x = X(i, (2, 5)).requires_grad_()
    y = mappings.gather_from_sequence(x, G, grad_is_partial=False)
    eq(y, torch.cat([X(j, (2, 5)) for j in range(n)], 0), **exact)
    y.backward(g(0, (2 * n, 5)))
    eq(x.grad, g(0, (2 * n, 5))[2 * i:2 * (i + 1)], **exact)

    # reduce-scatter ↔ all-gather along tokens.
    X, g = fam("rs_x"), fam("rs_g")
    x = X(i, (2 * n, 5)).requires_grad_()
    y = mappings.reduce_scatter_to_sequence(x, G)
    eq(y, sum(X(j, (2 * n, 5)) for j in range(n))[2 * i:2 * (i + 1)], **SUM_TOL)
    eq(x.detach(), X(i, (2 * n, 5)), **exact)
    y.backward(g(i, (2, 5)))
    eq(x.grad, torch.cat([g(j, (2, 5)) for j in range(n)], 0), **exact)

    # The conjugate pairs compose to the unsharded computation: scatter then gather is identity,
    # copy then reduce is n·x, for values and gradients.
    x = X(0, (2 * n, 4 * n)).requires_grad_()
    y = mappings.gather_from_sequence(mappings.scatter_to_sequence(x, G), G, grad_is_partial=False)
    y = mappings.gather_from_tp(mappings.scatter_to_tp(y, G), G)
    eq(y, x.detach(), **exact)
    y.backward(g(0, y.shape))
    eq(x.grad, g(0, y.shape), **exact)
    return True


@pytest.mark.parametrize("kwargs", LAYOUTS)
def test_conjugate_pairs_against_unsharded(dist_pool, kwargs):
    assert all(dist_pool(4).run(_check_all_mappings, kwargs))


def _check_reduce_scatter_dim(kwargs, native: bool):
    """reduce_scatter_dim on gloo through the all-reduce fallback and, with the backend check
    patched, through dist.reduce_scatter (which this torch's gloo has)."""
    lay = ParallelLayout(**kwargs)
    G, n, i, d = lay.tp_group, lay.tp_size, lay.tp_rank, lay.dp_rank
    saved = mappings._backend_is_gloo
    if native:
        mappings._backend_is_gloo = lambda group: False
    try:
        for dim, shape in ((0, (2 * n, 3)), (1, (3, 2 * n, 2)), (-1, (3, 4 * n))):
            x = _data(("rsd", d, dim), i, shape)
            before = x.clone()
            y = mappings.reduce_scatter_dim(x, dim, G)
            full = sum(_data(("rsd", d, dim), j, shape) for j in range(n))
            torch.testing.assert_close(y, full.chunk(n, dim)[i], **SUM_TOL)
            assert y.is_contiguous()
            torch.testing.assert_close(x, before, rtol=0, atol=0)  # the input is not reduced in place
        raised = []
        for fn in (mappings.reduce_scatter_dim, mappings.split_dim):
            try:  # 2n+1 rows do not split into n (chunk would make unequal or too few pieces)
                fn(torch.zeros(2 * n + 1, 3), 0, G)
            except ValueError as e:
                raised.append(str(e))
        return raised
    finally:
        mappings._backend_is_gloo = saved


@pytest.mark.parametrize("native", [False, True], ids=["gloo-fallback", "reduce_scatter"])
@pytest.mark.parametrize("kwargs", [LAYOUTS[1], LAYOUTS[2]])
def test_reduce_scatter_dim(dist_pool, kwargs, native):
    for raised in dist_pool(4).run(_check_reduce_scatter_dim, kwargs, native):
        assert len(raised) == 2 and all("does not split" in m for m in raised), raised


def test_group_of_one_is_the_identity():
    x = torch.randn(4, 6, requires_grad=True)
    for fn in (mappings.copy_to_tp, mappings.reduce_from_tp, mappings.scatter_to_tp,
               mappings.gather_from_tp, mappings.scatter_to_sequence, mappings.gather_from_sequence,
               mappings.reduce_scatter_to_sequence):
        assert fn(x, None) is x
    assert mappings.reduce_scatter_dim(x, 0, None) is x
    assert mappings.all_gather_dim(x, 0, None) is x
