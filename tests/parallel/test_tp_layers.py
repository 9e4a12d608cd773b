"""meshrl's tensor-parallel layers against megatron-core 0.16.1 and against meshrl's own unsharded
run, on a gloo pool of 4 ranks: tp=2 as two groups side by side (also in a permuted rank order) and
tp=4 (permuted).

What megatron-core cannot run on CPU (each path calls ``torch.cuda.current_device()`` to allocate
its output; checked on 0.16.1 with a CPU-only torch):
- ColumnParallelLinear(gather_output=True) (``_gather_along_last_dim``),
- RowParallelLinear(input_is_parallel=False) (the scatter's backward all-gathers the same way),
- sequence parallelism in either linear layer, and
  VocabParallelEmbedding(reduce_scatter_embeddings=True) (``_gather_along_first_dim`` /
  ``_reduce_scatter_along_first_dim``, and the linear's backward).
Those meshrl paths are compared with the unsharded computation (meshrl's layer at tp=1) instead.
ColumnParallelLinear / RowParallelLinear (input parallel) / VocabParallelEmbedding take the layout's
tp group directly (``tp_group=``); ``vocab_parallel_cross_entropy`` reads megatron's global parallel
state, so that case calls ``initialize_model_parallel`` in each worker and destroys it afterwards.

All cases are fp32. Tolerances (TOL): outputs and gradients are dot products of ≤ 16 terms of size
~1 that tp splits into partial sums added in another order, so they differ from the unsharded (or
megatron's) result by a few ulp of values ≲ 10: 1e-5 relative and absolute; log-probs over ≤ 32
columns against a float64 oracle sit well inside the same bound. Embedding lookups and the -inf
padding move data only: bitwise (EXACT).
"""
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

from meshrl.parallel import layers as L
from meshrl.parallel.layout import ParallelLayout, single_process_layout
from meshrl.parallel.sharding import padded_size

TOL = dict(rtol=1e-5, atol=1e-5)
EXACT = dict(rtol=0, atol=0)

LAYOUTS = [
    pytest.param(dict(ranks=[0, 1, 2, 3], tp=2, dp=2), id="tp2x2"),
    pytest.param(dict(ranks=[3, 1, 2, 0], tp=2, dp=2), id="tp2x2-permuted"),
    pytest.param(dict(ranks=[3, 1, 2, 0], tp=4), id="tp4-permuted"),
]


def _rand(key, *shape, dtype=torch.float32):
    """The same tensor on every rank for the same key (crc32: str hashes differ per process)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    return torch.randn(shape, generator=g, dtype=dtype)


def _ids(key, n, vocab, tp):
    """Token ids covering 0, vocab-1, every shard boundary (padded split) and repeats."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    step = padded_size(vocab, tp) // tp
    bounds = {min(vocab - 1, b) for r in range(1, tp) for b in (r * step - 1, r * step)}
    edges = sorted({0, vocab - 1} | bounds)
    rest = torch.randint(0, vocab, (n - len(edges) - 2,), generator=g)
    return torch.cat([torch.tensor(edges), rest, torch.tensor(edges[:2])])


def _load(param, full):
    """Copy this rank's slice (per its ShardSpec) of a full tensor into a meshrl parameter."""
    with torch.no_grad():
        param.copy_(param.shard_spec.slice_full(full))


def _rows(lay, size):
    k = size // lay.tp_size
    return slice(lay.tp_rank * k, (lay.tp_rank + 1) * k)


def _tok(lay, n_tokens):
    return _rows(lay, n_tokens)


def _check(results):
    """results: per rank, a list of (name, actual, expected, tol)."""
    assert results and all(results)
    for rank, items in enumerate(results):
        for name, actual, expected, tol in items:
            torch.testing.assert_close(actual, expected, **tol,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")


def _megatron():
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex.*")
    from megatron.core import ModelParallelConfig
    from megatron.core import tensor_parallel as mtp
    return ModelParallelConfig, mtp


def _config(tp):
    ModelParallelConfig, _ = _megatron()
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=torch.float32)


def _no_init(_):
    pass


# ---- against megatron-core ----------------------------------------------------------------------


def _column_vs_megatron(kwargs):
    _, mtp = _megatron()
    lay = ParallelLayout(**kwargs)
    G, n, d = lay.tp_group, lay.tp_size, lay.dp_rank
    IN, OUT = 16, 12
    W, b = _rand(("colW", d), OUT, IN), _rand(("colb", d), OUT)
    X, R = _rand(("colx", d), 3, 2, IN), _rand(("colR", d), 3, 2, OUT)  # [s, b, h] leading dims

    ours = L.ColumnParallelLinear(IN, OUT, lay, bias=True)
    _load(ours.weight, W), _load(ours.bias, b)
    theirs = mtp.ColumnParallelLinear(IN, OUT, config=_config(n), init_method=_no_init, bias=True,
                                      gather_output=False, tp_group=G)
    k = OUT // n
    mine = slice(G.rank() * k, (G.rank() + 1) * k)  # megatron's own convention: its group rank
    with torch.no_grad():
        theirs.weight.copy_(W[mine]), theirs.bias.copy_(b[mine])

    x1, x2 = X.clone().requires_grad_(), X.clone().requires_grad_()
    y1 = ours(x1)
    y2, _ = theirs(x2)
    y1.backward(R[..., _rows(lay, OUT)])
    y2.backward(R[..., mine])
    xr = X.clone().requires_grad_()
    yr = F.linear(xr, W, b)
    yr.backward(R)
    c = _rows(lay, OUT)
    return [("y vs megatron", y1, y2, TOL), ("y vs unsharded", y1, yr[..., c], TOL),
            ("x.grad vs megatron", x1.grad, x2.grad, TOL),
            ("x.grad vs unsharded", x1.grad, xr.grad, TOL),
            ("W.grad vs megatron", ours.weight.grad, theirs.weight.grad, TOL),
            ("b.grad vs megatron", ours.bias.grad, theirs.bias.grad, TOL),
            ("W.grad vs unsharded", ours.weight.grad,
             R[..., c].reshape(-1, k).t() @ X.reshape(-1, IN), TOL)]


def _row_vs_megatron(kwargs):
    _, mtp = _megatron()
    lay = ParallelLayout(**kwargs)
    G, n, d = lay.tp_group, lay.tp_size, lay.dp_rank
    IN, OUT, N = 16, 10, 6
    W, b = _rand(("rowW", d), OUT, IN), _rand(("rowb", d), OUT)
    X, R = _rand(("rowx", d), N, IN), _rand(("rowR", d), N, OUT)

    ours = L.RowParallelLinear(IN, OUT, lay, bias=True, input_is_parallel=True)
    _load(ours.weight, W), _load(ours.bias, b)
    theirs = mtp.RowParallelLinear(IN, OUT, config=_config(n), init_method=_no_init, bias=True,
                                   input_is_parallel=True, skip_bias_add=False, tp_group=G)
    k = IN // n
    mine = slice(G.rank() * k, (G.rank() + 1) * k)
    with torch.no_grad():
        theirs.weight.copy_(W[:, mine]), theirs.bias.copy_(b)

    c = _rows(lay, IN)
    x1, x2 = X[:, c].clone().requires_grad_(), X[:, mine].clone().requires_grad_()
    y1 = ours(x1)
    y2, _ = theirs(x2)
    y1.backward(R), y2.backward(R)
    xr = X.clone().requires_grad_()
    F.linear(xr, W, b).backward(R)
    return [("y vs megatron", y1, y2, TOL), ("y vs unsharded", y1, F.linear(X, W, b), TOL),
            ("x.grad vs megatron", x1.grad, x2.grad, TOL),
            ("x.grad vs unsharded", x1.grad, xr.grad[:, c], TOL),
            ("W.grad vs megatron", ours.weight.grad, theirs.weight.grad, TOL),
            ("W.grad vs unsharded", ours.weight.grad, R.t() @ X[:, c], TOL),
            ("b.grad vs megatron", ours.bias.grad, theirs.bias.grad, TOL)]


def _embedding_vs_megatron(kwargs, vocab):
    _, mtp = _megatron()
    lay = ParallelLayout(**kwargs)
    G, n, d = lay.tp_group, lay.tp_size, lay.dp_rank
    H, N = 8, 20
    padded = padded_size(vocab, n)  # megatron needs a divisible vocabulary: give it the padded one
    E = _rand(("E", d), vocab, H)
    Ep = torch.cat([E, torch.zeros(padded - vocab, H)])
    ids, R = _ids(("ids", d), N, vocab, n), _rand(("embR", d), N, H)

    ours = L.VocabParallelEmbedding(vocab, H, lay)
    _load(ours.weight, E)
    theirs = mtp.VocabParallelEmbedding(padded, H, init_method=_no_init, config=_config(n), tp_group=G)
    k = padded // n
    with torch.no_grad():
        theirs.weight.copy_(Ep[G.rank() * k:(G.rank() + 1) * k])
    y1, y2 = ours(ids), theirs(ids)
    y1.backward(R), y2.backward(R)
    full_grad = torch.zeros(padded, H).index_add_(0, ids, R)
    c = _rows(lay, padded)
    return [("y vs megatron", y1, y2, EXACT), ("y vs unsharded", y1, E[ids], EXACT),
            ("W.grad vs megatron", ours.weight.grad, theirs.weight.grad, TOL),
            ("W.grad vs unsharded (padding rows 0)", ours.weight.grad, full_grad[c], TOL)]


@pytest.mark.parametrize("kwargs", LAYOUTS)
def test_column_parallel_linear_vs_megatron(dist_pool, kwargs):
    _check(dist_pool(4).run(_column_vs_megatron, kwargs))


@pytest.mark.parametrize("kwargs", LAYOUTS)
def test_row_parallel_linear_vs_megatron(dist_pool, kwargs):
    _check(dist_pool(4).run(_row_vs_megatron, kwargs))


@pytest.mark.parametrize("kwargs", LAYOUTS)
def test_vocab_parallel_embedding_vs_megatron(dist_pool, kwargs):
    # vocab 30: divisible at tp=2, padded to 32 at tp=4 (ids on every shard boundary)
    _check(dist_pool(4).run(_embedding_vs_megatron, kwargs, 30))


def _cross_entropy_vs_megatron(tp, vocab):
    """megatron's vocab_parallel_cross_entropy against -meshrl.kernels.token_logprobs on the same
    logits, padded columns at -inf; both against a float64 log-softmax of the full logits."""
    from megatron.core import parallel_state as ps
    _, mtp = _megatron()
    from meshrl.kernels import token_logprobs
    lay = ParallelLayout(ranks=range(4), tp=tp, dp=4 // tp)
    d, N = lay.dp_rank, 12
    padded = padded_size(vocab, tp)
    Z = _rand(("Z", d), N, vocab) * 3
    Zp = torch.cat([Z, torch.full((N, padded - vocab), float("-inf"))], 1)
    labels, w = _ids(("lab", d), N, vocab, tp), _rand(("w", d), N)
    k = padded // tp
    ref_logp = torch.log_softmax(Z.double(), -1).gather(1, labels[:, None])[:, 0]
    ref_grad = (w.double()[:, None] * (torch.softmax(Z.double(), -1)
                                        - F.one_hot(labels, vocab).double())).float()
    ref_grad = torch.cat([ref_grad, torch.zeros(N, padded - vocab)], 1)
    out = []
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        assert ps.get_data_parallel_rank() == d  # the same replicas as the layout's tp groups
        r = ps.get_tensor_model_parallel_rank()
        leaf = Zp[:, r * k:(r + 1) * k].clone().requires_grad_()
        loss = mtp.vocab_parallel_cross_entropy(leaf.clone(), labels)  # it edits its input in place
        loss.backward(w)
        out += [("megatron loss vs float64", loss, -ref_logp.float(), TOL),
                ("megatron grad vs float64", leaf.grad, ref_grad[:, r * k:(r + 1) * k], TOL)]
    finally:
        ps.destroy_model_parallel()
    c = _rows(lay, padded)
    garbage = torch.where(Zp[:, c].isinf(), 50.0, Zp[:, c])  # finite padding, cut by vocab_size
    for how, cols, kw in (("-inf padding", Zp[:, c], {}),
                          ("vocab_size", garbage, {"vocab_size": vocab})):
        z = cols.clone().requires_grad_()
        nll = -token_logprobs(z, labels, tp_group=lay.tp_group, **kw)
        nll.backward(w)
        out += [(f"meshrl nll ({how}) vs megatron", nll, loss.detach(), TOL),
                (f"meshrl grad ({how}) vs float64", z.grad, ref_grad[:, c], TOL)]
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_cross_entropy_vs_megatron(dist_pool, tp):
    pytest.importorskip("meshrl.kernels.logprobs")
    # vocab 30: unpadded at tp=2; padded to 32 at tp=4 (rank 3 holds 6 real and 2 -inf columns)
    _check(dist_pool(4).run(_cross_entropy_vs_megatron, tp, 30))


@pytest.mark.parametrize("vocab", [13, 9])
def test_cross_entropy_with_heavy_padding(dist_pool, vocab):
    pytest.importorskip("meshrl.kernels.logprobs")
    # at tp=4, vocab 13 -> 16 columns: rank 3 holds one real column and 3 padded ones;
    # vocab 9 -> 12 columns: rank 3 holds padding only (its local max is -inf)
    _check(dist_pool(4).run(_cross_entropy_vs_megatron, 4, vocab))


# ---- against meshrl's own unsharded run (paths megatron cannot run on CPU) ----------------------


def _sp_and_gather_paths(kwargs, vocab):
    lay = ParallelLayout(**kwargs)
    G, n, d = lay.tp_group, lay.tp_size, lay.dp_rank
    one = single_process_layout()
    H, FF, N = 8, 16, 16  # N tokens split over tp under sequence parallelism
    t = _tok(lay, N)
    out = []

    # Column (SP) -> gelu -> Row (SP): an MLP block; tokens enter and leave split over tp.
    W1, b1, W2, b2 = (_rand(("W1", d), FF, H), _rand(("b1", d), FF), _rand(("W2", d), H, FF),
                      _rand(("b2", d), H))
    X, R = _rand(("X", d), N, H), _rand(("R", d), N, H)
    col = L.ColumnParallelLinear(H, FF, lay, bias=True, sequence_parallel=True)
    row = L.RowParallelLinear(FF, H, lay, bias=True, sequence_parallel=True)
    col_r = L.ColumnParallelLinear(H, FF, one, bias=True)
    row_r = L.RowParallelLinear(FF, H, one, bias=True)
    for m in (col, col_r):
        _load(m.weight, W1), _load(m.bias, b1)
    for m in (row, row_r):
        _load(m.weight, W2), _load(m.bias, b2)
    x = X[t].clone().requires_grad_()
    h = col(x)
    h.retain_grad()
    y = row(F.gelu(h))
    y.backward(R[t])
    xr = X.clone().requires_grad_()
    hr = col_r(xr)
    hr.retain_grad()
    yr = row_r(F.gelu(hr))
    yr.backward(R)
    f = _rows(lay, FF)
    assert row.bias.tp_partial_grad  # each rank saw only its tokens' share of the bias gradient
    L.sync_tp_partial_grads([row.bias, row.weight, col.weight], G)
    out += [("SP mlp y", y, yr[t], TOL), ("SP mlp x.grad", x.grad, xr.grad[t], TOL),
            ("SP col h (all tokens, my columns)", h, hr[:, f], TOL),
            ("SP col h.grad", h.grad, hr.grad[:, f], TOL),
            ("SP col W.grad", col.weight.grad, col_r.weight.grad[f], TOL),
            ("SP col b.grad", col.bias.grad, col_r.bias.grad[f], TOL),
            ("SP row W.grad", row.weight.grad, row_r.weight.grad[:, f], TOL),
            ("SP row b.grad (after sync)", row.bias.grad, row_r.bias.grad, TOL)]

    # ColumnParallelLinear(gather_output=True) -> RowParallelLinear(input_is_parallel=False).
    col = L.ColumnParallelLinear(H, FF, lay, bias=True, gather_output=True)
    row = L.RowParallelLinear(FF, H, lay, bias=True, input_is_parallel=False)
    _load(col.weight, W1), _load(col.bias, b1), _load(row.weight, W2), _load(row.bias, b2)
    x = X.clone().requires_grad_()
    h = col(x)
    h.retain_grad()
    y = row(F.gelu(h))
    y.backward(R)
    col_r.zero_grad(), row_r.zero_grad()
    xr = X.clone().requires_grad_()
    hr = col_r(xr)
    hr.retain_grad()
    row_r(F.gelu(hr)).backward(R)
    out += [("gather_output h", h, hr, TOL), ("gather/scatter y", y, yr, TOL),
            ("gather/scatter h.grad", h.grad, hr.grad, TOL),
            ("gather/scatter x.grad", x.grad, xr.grad, TOL),
            ("gather col W.grad", col.weight.grad, col_r.weight.grad[f], TOL),
            ("scatter row W.grad", row.weight.grad, row_r.weight.grad[:, f], TOL),
            ("scatter row b.grad", row.bias.grad, row_r.bias.grad, TOL)]

    # VocabParallelEmbedding with SP: all tokens in, this rank's tokens out (a padded vocabulary).
    E, ids, RE = _rand(("E", d), vocab, H), _ids(("ids", d), N, vocab, n), _rand(("RE", d), N, H)
    emb, emb_r = (L.VocabParallelEmbedding(vocab, H, lay, sequence_parallel=True),
                  L.VocabParallelEmbedding(vocab, H, one))
    _load(emb.weight, E), _load(emb_r.weight, E)
    e, er = emb(ids), emb_r(ids)
    e.backward(RE[t]), er.backward(RE)
    spec = emb.weight.shard_spec
    out += [("SP embedding y", e, er[t], EXACT),
            ("SP embedding W.grad", emb.weight.grad[spec.local_valid_index()],
             emb_r.weight.grad[spec.full_index()], TOL),
            ("SP embedding W.grad padding", emb.weight.grad[spec.valid_len:],
             torch.zeros(spec.stop - spec.start - spec.valid_len, H), EXACT)]

    # VocabParallelOutput, with and without SP: my columns of the logits, padded ones at -inf.
    Wo, Hs, RL = _rand(("Wo", d), vocab, H), _rand(("Hs", d), N, H), _rand(("RL", d), N, vocab)
    head_r = L.VocabParallelOutput(H, vocab, one)
    _load(head_r.weight, Wo)
    hr = Hs.clone().requires_grad_()
    lr = head_r(hr)
    lr.backward(RL)
    for sp in (False, True):
        head = L.VocabParallelOutput(H, vocab, lay, sequence_parallel=sp)
        _load(head.weight, Wo)
        spec = head.weight.shard_spec
        v = spec.valid_len
        h = (Hs[t] if sp else Hs).clone().requires_grad_()
        logits = head(h)
        pad = logits[:, v:]
        # the loss reads real columns only: -inf padding times anything is not a gradient
        logits[:, :v].backward(RL[:, spec.start:spec.valid_stop])
        real = slice(spec.start, spec.valid_stop)
        out += [(f"output sp={sp} logits", logits[:, :v], lr[:, real], TOL),
                (f"output sp={sp} padding is -inf", pad, torch.full_like(pad, float("-inf")), EXACT),
                (f"output sp={sp} h.grad", h.grad, hr.grad[t] if sp else hr.grad, TOL),
                (f"output sp={sp} W.grad", head.weight.grad[:v], head_r.weight.grad[real], TOL),
                (f"output sp={sp} W.grad padding", head.weight.grad[v:],
                 torch.zeros_like(head.weight.grad[v:]), EXACT)]
    return out


@pytest.mark.parametrize("kwargs", LAYOUTS)
def test_sequence_parallel_and_gather_paths_vs_unsharded(dist_pool, kwargs):
    # vocab 30: padded to 32 at tp=4
    _check(dist_pool(4).run(_sp_and_gather_paths, kwargs, 30))
