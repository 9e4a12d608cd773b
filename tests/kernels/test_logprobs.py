import pytest
import torch

from meshrl.kernels import token_logprobs

from oracles import assert_within, logprob_oracle, logprob_oracle_analytic, oracle_grads

# Outputs are fp32 from fp32 arithmetic on the exact input values (bf16 inputs included, since the
# oracle reads the same rounded values): the error is a few fp32 roundings of V-term sums.
OUT_TOL = dict(atol=5e-5, rtol=1e-5)
# Gradients come back in the logits' dtype: fp32 keeps ~1e-6 relative; bf16 rounds each element to
# 8 mantissa bits, i.e. up to 2^-8 relative.
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-4), torch.bfloat16: dict(atol=1e-6, rtol=2 ** -8)}


def _check(device, n, v, dtype, temperature=1.0, vocab_size=None, pad_inf=0, seed=0, analytic=False,
           grad_tol=None):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype)
    real = v if vocab_size is None else vocab_size
    if pad_inf:
        logits[:, v - pad_inf:] = float("-inf")
        real = min(real, v - pad_inf)
    labels = torch.randint(0, real, (n,), generator=g)
    up_lp, up_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    x = logits.to(device, copy=True).requires_grad_()
    lp, ent = token_logprobs(x, labels.to(device), temperature=temperature, return_entropy=True,
                             vocab_size=vocab_size)
    assert lp.dtype == ent.dtype == torch.float32
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    (lp * up_lp.to(device) + ent * up_ent.to(device)).sum().backward()
    assert x.grad.dtype == dtype

    if analytic:
        o_lp, o_ent, o_grad = logprob_oracle_analytic(logits, labels, up_lp, up_ent, temperature,
                                                      vocab_size)
    else:
        (o_lp, o_ent), (o_grad,) = oracle_grads(
            lambda z: logprob_oracle(z, labels, temperature, vocab_size), [logits], [up_lp, up_ent])
    assert_within(lp.detach(), o_lp, **OUT_TOL)
    assert_within(ent.detach(), o_ent, **OUT_TOL)
    assert_within(x.grad, o_grad, **(grad_tol or GRAD_TOL[dtype]))
    return x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama2_vocab_odd_batch(device, dtype):
    _check(device, 3 * 423, 32000, dtype, analytic=True)  # [3, 423, 32000] flattened


def test_analytic_oracle_matches_autograd_oracle():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(70, 45, generator=g) * 4
    logits[:, -3:] = float("-inf")
    labels = torch.randint(0, 40, (70,), generator=g)
    up = [torch.randn(70, generator=g), torch.randn(70, generator=g)]
    for vocab_size in (None, 40):
        (lp, ent), (grad,) = oracle_grads(lambda z: logprob_oracle(z, labels, 0.8, vocab_size),
                                          [logits], up)
        a_lp, a_ent, a_grad = logprob_oracle_analytic(logits, labels, *up, 0.8, vocab_size, rows=16)
        for got, want in ((a_lp, lp), (a_ent, ent), (a_grad, grad)):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_tiny_odd_shapes(device, dtype, temperature):
    _check(device, 9 * 7, 41, dtype, temperature)
    _check(device, 1, 41, dtype, temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minus_inf_padding_columns(device, dtype):
    grad = _check(device, 50, 1000, dtype, pad_inf=24)
    assert (grad[:, -24:] == 0).all()


def test_vocab_size_masks_padding_columns(device):
    grad = _check(device, 33, 1000, torch.float32, vocab_size=990, temperature=1.3)
    assert (grad[:, 990:] == 0).all()


def test_logprob_only_and_entropy_only_gradients(device):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(17, 300, generator=g)
    labels = torch.randint(0, 300, (17,), generator=g)
    for use in ("logp", "ent"):
        x = logits.to(device, copy=True).requires_grad_()
        lp, ent = token_logprobs(x, labels.to(device), return_entropy=True)
        (lp if use == "logp" else ent).sum().backward()
        _, (o_grad,) = oracle_grads(lambda z: (logprob_oracle(z, labels)[0 if use == "logp" else 1],),
                                    [logits], [torch.ones(17)])
        assert_within(x.grad, o_grad, **GRAD_TOL[torch.float32])


def test_input_is_left_untouched(device):
    logits = torch.randn(8, 100, device=device)
    before = logits.clone()
    x = logits.clone().requires_grad_()
    token_logprobs(x, torch.zeros(8, dtype=torch.long, device=device), temperature=0.5).sum().backward()
    assert torch.equal(x.detach(), before)


def test_returns_logprob_alone_by_default(device):
    out = token_logprobs(torch.randn(4, 10, device=device), torch.zeros(4, dtype=torch.long, device=device))
    assert isinstance(out, torch.Tensor) and out.shape == (4,)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        token_logprobs(torch.randn(4, 10), torch.zeros(3, dtype=torch.long))
