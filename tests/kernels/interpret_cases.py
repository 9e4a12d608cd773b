"""Triton kernels through the CPU interpreter, against the float64 oracles.

Triton decides at import (decoration) time whether kernels are interpreted, so these cases run in a
child pytest started by test_triton_interpret.py with TRITON_INTERPRET=1 and MESHRL_KERNELS=triton
already in its environment; the file name keeps the parent session from collecting it. Shapes are
small: the interpreter costs milliseconds per block operation.
"""
import os

import pytest
import torch

import test_gae as gae_tests
import test_linear_logprobs as linear_tests
import test_logprobs as logprob_tests
from meshrl.kernels import gae
from meshrl.kernels.logprobs import _partials_torch, row_partials

from oracles import gae_oracle

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
