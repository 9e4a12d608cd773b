"""Triton kernels through the CPU interpreter, against the float64 oracles.

Triton decides at import (decoration) time whether kernels are interpreted, so these cases run in a
child pytest started by test_triton_interpret.py with TRITON_INTERPRET=1 and MESHRL_KERNELS=triton
already in its environment; the file name keeps the parent session from collecting it. Shapes are
small: the interpreter costs milliseconds per block operation.
"""
import contextlib
import os

import pytest
import torch
import torch.distributed as dist

import test_gae as gae_tests
import test_linear_logprobs as linear_tests
import test_logprobs as logprob_tests
from meshrl.kernels import gae, token_logprobs
from meshrl.kernels.logprobs import _partials_torch, row_partials

from oracles import assert_within, gae_oracle, logprob_oracle, oracle_grads

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("MESHRL_KERNELS") != "triton",
    reason="run by test_triton_interpret.py with TRITON_INTERPRET=1 MESHRL_KERNELS=triton")
CPU = torch.device("cpu")
# The interpreter casts fp32 to bf16 by truncation (the GPU rounds to nearest), so bf16 gradients can
# be a whole bf16 ulp off: 2^-7 relative instead of 2^-8.
BF16_GRAD_TOL = {torch.float32: None, torch.bfloat16: dict(atol=1e-6, rtol=2 ** -7)}


def test_kernels_are_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    from meshrl.kernels.gae import _gae_kernel
    from meshrl.kernels.logprobs_triton import _grad_kernel, _stats_kernel

    for kernel in (_gae_kernel, _grad_kernel, _stats_kernel):
        assert isinstance(kernel, InterpretedFunction)


def test_dispatch_reaches_the_kernel(monkeypatch):
    from meshrl.kernels import logprobs_triton

    calls = []
    real = logprobs_triton.row_stats
    monkeypatch.setattr(logprobs_triton, "row_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = row_partials(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), 1.0, 0, 5)
    assert calls and out.shape == (4, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae(dtype, gamma, lam):
    lens = [1, 5, 300, 3, 70, 1]
    g = torch.Generator().manual_seed(0)
    n = sum(lens)
    r, v = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    boot = torch.randn(len(lens), generator=g)
    cu = gae_tests._cu(lens, "cpu")
    for bootstrap in (None, boot):
        adv, ret = gae(r, v, cu, bootstrap_values=bootstrap, gamma=gamma, lam=lam)
        o_adv, o_ret = gae_oracle(r, v, cu, bootstrap, gamma, lam)
        tol = 2e-6 * max(1.0, float(o_ret.abs().max())) + 1e-6  # as in test_gae.py
        torch.testing.assert_close(adv.double(), o_adv, atol=tol, rtol=0)
        torch.testing.assert_close(ret.double(), o_ret, atol=tol, rtol=0)


def test_gae_golden():
    gae_tests.test_golden_monte_carlo_when_gamma_lambda_one(CPU)
    gae_tests.test_golden_td_errors_when_lambda_zero(CPU)
    gae_tests.test_golden_half_discount(CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs(dtype):
    tol = BF16_GRAD_TOL[dtype]
    logprob_tests._check(CPU, 9 * 7, 41, dtype, temperature=0.7, grad_tol=tol)
    logprob_tests._check(CPU, 1, 41, dtype, grad_tol=tol)
    logprob_tests._check(CPU, 24, 32000, dtype, pad_inf=100, analytic=True, grad_tol=tol)  # 32k block


def test_token_logprobs_vocab_size_and_single_gradients():
    logprob_tests.test_vocab_size_masks_padding_columns(CPU)
    logprob_tests.test_logprob_only_and_entropy_only_gradients(CPU)


@pytest.mark.parametrize("offset,n_valid", [(0, 300), (1000, 300), (1000, 257), (1000, 0)])
def test_shard_partials_match_torch_path(offset, n_valid):
    # Tensor-parallel shards and vocabulary chunks both rest on these partials.
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(19, 300, generator=g) * 3
    labels = torch.randint(900, 1400, (19,), generator=g)
    got = row_partials(logits, labels, 0.8, offset, n_valid)
    want = _partials_torch(logits, labels, 0.8, offset, n_valid)
    if n_valid == 0:  # the max of no columns is only a sentinel; sum-exp 0 is what matters
        got, want = got[1:], want[1:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_token_logprobs(dtype):
    linear_tests.test_matches_float64_oracle(CPU, dtype, 48, 64, 9000, 8990, 4096 * 8)
    linear_tests.test_matches_float64_oracle(CPU, dtype, 1, 16, 300, None, 64)


# --- several blocks per row -----------------------------------------------------------------------
# On CPU the default block is as wide as the row (the interpreter pays per block op), so every case
# above reduces a row in one block and the online-softmax rescale (alpha, and t's shift by m − m_new)
# never runs. These cases force 16-column blocks through the host functions' own `block` keyword:
# the public functions take no block size, so the host functions are wrapped for the duration.
SMALL_BLOCK = 16


@contextlib.contextmanager
def _blocks_of(block):
    """Run the log-prob kernels with `block` columns per block; yield the list of launch widths."""
    from meshrl.kernels import logprobs_triton as lt

    widths = []
    stats, grad = lt.row_stats, lt.logits_grad

    def small_stats(logits, labels, inv_t, offset, n_valid, *, finalize):
        widths.append(("stats", n_valid))
        return stats(logits, labels, inv_t, offset, n_valid, finalize=finalize, block=block)

    def small_grad(logits, *args):
        widths.append(("grad", logits.shape[1]))
        return grad(logits, *args, block=block)

    lt.row_stats, lt.logits_grad = small_stats, small_grad
    try:
        yield widths
    finally:
        lt.row_stats, lt.logits_grad = stats, grad


def _assert_multiblock(widths):
    # both kernels ran, each over rows spanning several blocks
    assert {kind for kind, _ in widths} == {"stats", "grad"}, widths
    assert min(n for _, n in widths) > 2 * SMALL_BLOCK, widths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_several_blocks_per_row(dtype):
    tol = BF16_GRAD_TOL[dtype]
    with _blocks_of(SMALL_BLOCK) as widths:
        # 300 = 18 full blocks + 12 columns: the last block is partly masked
        logprob_tests._check(CPU, 7, 300, dtype, temperature=0.7, grad_tol=tol)
        # −inf logits in columns 280..299 straddle the block boundary at 288, and block 288..303
        # holds no finite logit at all: its e must be 0 and its alpha 1, with no NaN from 0·(−inf)
        grad = logprob_tests._check(CPU, 7, 300, dtype, pad_inf=20, seed=1, grad_tol=tol)
        assert (grad[:, 280:] == 0).all()
        # vocab_size masks finite garbage in columns 291..299 inside the last block
        grad = logprob_tests._check(CPU, 7, 300, dtype, vocab_size=291, seed=2, temperature=1.3,
                                    grad_tol=tol)
        assert (grad[:, 291:] == 0).all()
    _assert_multiblock(widths)


def test_rising_maximum_rescales_every_block():
    # Row maxima that grow block after block make every block rescale the running sums; and a
    # label in the first block makes the log-prob depend on that rescale directly.
    n, v = 5, 300
    noise = torch.randn(n, v, generator=torch.Generator().manual_seed(4))
    logits = torch.linspace(0, 12, v).repeat(n, 1) + noise
    labels = torch.tensor([0, 3, 17, 150, 299])
    with _blocks_of(SMALL_BLOCK) as widths:
        x = logits.clone().requires_grad_()
        lp, ent = token_logprobs(x, labels, return_entropy=True)
        (lp + ent).sum().backward()
    _assert_multiblock(widths)
    (o_lp, o_ent), (o_grad,) = oracle_grads(lambda z: logprob_oracle(z, labels), [logits],
                                            [torch.ones(n), torch.ones(n)])
    assert_within(lp.detach(), o_lp, **logprob_tests.OUT_TOL)
    assert_within(ent.detach(), o_ent, **logprob_tests.OUT_TOL)
    assert_within(x.grad, o_grad, **logprob_tests.GRAD_TOL[torch.float32])


@pytest.mark.parametrize("offset,n_valid", [(0, 300), (1000, 289), (1000, 0)])
def test_shard_partials_several_blocks(offset, n_valid):
    # the non-finalized partials (tensor-parallel shards and vocabulary chunks combine these)
    from meshrl.kernels import logprobs_triton
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 300, generator=g) * 3
    labels = torch.randint(900, 1400, (7,), generator=g)
    got = logprobs_triton.row_stats(logits, labels, 0.8, offset, n_valid, finalize=False,
                                    block=SMALL_BLOCK)
    want = _partials_torch(logits, labels, 0.8, offset, n_valid)
    if n_valid == 0:  # the max of no columns is only a sentinel; sum-exp 0 is what matters
        got, want = got[1:], want[1:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _rank_small_blocks(logits, labels, up, vocab_size, dtype):
    rank, world = dist.get_rank(), dist.get_world_size()
    width = logits.shape[1] // world
    x = logits[:, rank * width:(rank + 1) * width].to(dtype).requires_grad_()
    with _blocks_of(SMALL_BLOCK) as widths:
        lp, ent = token_logprobs(x, labels, temperature=0.9, return_entropy=True,
                                 tp_group=dist.group.WORLD, vocab_size=vocab_size)
        (lp * up[0] + ent * up[1]).sum().backward()
    return lp, ent, x.grad, widths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab_size,inf_cols", [
    (299, None),  # 299 is not divisible by tp=2: padded to 300, rank 1 has 149 real columns
    (None, (140, 160)),  # −inf across rank 0's block boundary at 144 and the shard boundary at 150
])
def test_vocab_parallel_several_blocks(dist_pool, dtype, vocab_size, inf_cols):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(9, 300, generator=g) * 3
    if vocab_size:
        logits[:, vocab_size:] = 1e4  # padding garbage that must be ignored
    if inf_cols:
        logits[:, inf_cols[0]:inf_cols[1]] = float("-inf")
    real = [c for c in range(vocab_size or 300) if not inf_cols or not inf_cols[0] <= c < inf_cols[1]]
    labels = torch.tensor(real)[torch.randint(0, len(real), (9,), generator=g)]
    up = [torch.randn(9, generator=g), torch.randn(9, generator=g)]
    results = dist_pool(2).run(_rank_small_blocks, logits, labels, up, vocab_size, dtype)
    (o_lp, o_ent), (o_grad,) = oracle_grads(
        lambda z: logprob_oracle(z, labels, 0.9, vocab_size), [logits.to(dtype)], up)
    for lp, ent, _, widths in results:  # every rank holds the full answer
        _assert_multiblock(widths)
        assert_within(lp, o_lp, **logprob_tests.OUT_TOL)
        assert_within(ent, o_ent, **logprob_tests.OUT_TOL)
    grad = torch.cat([r[2] for r in results], 1)
    assert_within(grad, o_grad, **(BF16_GRAD_TOL[dtype] or logprob_tests.GRAD_TOL[dtype]))
    if vocab_size:
        assert (grad[:, vocab_size:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_token_logprobs_several_blocks(dtype):
    # 7·150-element chunks: one row by 150 columns, so 291 real columns are two vocabulary chunks
    # (150 and 141 columns), each several blocks, combined across chunks as across tp ranks
    with _blocks_of(SMALL_BLOCK) as widths:
        linear_tests.test_matches_float64_oracle(CPU, dtype, 7, 16, 300, 291, 150)
    _assert_multiblock(widths)
