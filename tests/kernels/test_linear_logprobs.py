import pytest
import torch

from meshrl.kernels import linear_token_logprobs, token_logprobs
from meshrl.kernels.linear_logprobs import chunk_shape

from oracles import assert_within, logprob_oracle, oracle_grads


def _oracle(hidden, weight, labels, up, temperature, vocab_size):
    return oracle_grads(lambda h, w: logprob_oracle(h @ w.T, labels, temperature, vocab_size),
                        [hidden, weight], up)


# fp32: the matmul's fp32 rounding of H-term dot products dominates. bf16: the logits chunk is
# rounded to bf16 (2^-8 relative, |z| up to ~8 here), so outputs carry up to ~2^-8·8 absolute error;
# the bf16 gradients are additionally rounded to 8 bits, hence the loose relative term.
TOL = {
    torch.float32: dict(out=dict(atol=1e-4, rtol=1e-5), grad=dict(atol=1e-4, rtol=1e-4)),
    torch.bfloat16: dict(out=dict(atol=6e-2, rtol=1e-2), grad=dict(atol=6e-2, rtol=3e-2)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v,vocab_size,chunk", [
    (63, 32, 41, None, None),  # 9×7 tokens, one chunk
    (48, 64, 9000, 8990, 4096 * 8),  # 6 row chunks × 3 vocabulary chunks, 10 padded rows
    (1, 16, 300, None, 64),  # one token, many thin chunks
])
def test_matches_float64_oracle(device, dtype, n, h, v, vocab_size, chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5 * 2).to(dtype)
    if vocab_size is not None:
        weight[vocab_size:] = 0
    labels = torch.randint(0, vocab_size or v, (n,), generator=g)
    up = [torch.randn(n, generator=g), torch.randn(n, generator=g)]
    hx = hidden.to(device, copy=True).requires_grad_()
    wx = weight.to(device, copy=True).requires_grad_()
    lp, ent = linear_token_logprobs(hx, wx, labels.to(device), temperature=0.9, return_entropy=True,
                                    vocab_size=vocab_size, max_chunk_elems=chunk)
    (lp * up[0].to(device) + ent * up[1].to(device)).sum().backward()
    (o_lp, o_ent), (o_gh, o_gw) = _oracle(hidden, weight, labels, up, 0.9, vocab_size)
    tol = TOL[dtype]
    assert_within(lp, o_lp, **tol["out"])
    assert_within(ent, o_ent, **tol["out"])
    assert hx.grad.dtype == wx.grad.dtype == dtype
    assert_within(hx.grad, o_gh, **tol["grad"])
    assert_within(wx.grad, o_gw, **tol["grad"])
    if vocab_size is not None:
        assert (wx.grad[vocab_size:] == 0).all()


def test_chunking_does_not_change_the_result(device):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 24, generator=g, dtype=torch.float64).float().to(device)
    weight = torch.randn(700, 24, generator=g).to(device)
    labels = torch.randint(0, 700, (40,), generator=g).to(device)
    whole = token_logprobs(hidden @ weight.T, labels, return_entropy=True)
    for chunk in (50, 1000, 10 ** 9):
        parts = linear_token_logprobs(hidden, weight, labels, return_entropy=True, max_chunk_elems=chunk)
        for a, b in zip(parts, whole):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)  # fp32 reassociation only


def test_frozen_weight_gets_no_gradient(device):
    hidden = torch.randn(5, 8, device=device, requires_grad=True)
    weight = torch.randn(30, 8, device=device)
    linear_token_logprobs(hidden, weight, torch.zeros(5, dtype=torch.long, device=device)).sum().backward()
    assert hidden.grad is not None and weight.grad is None


def test_chunk_shape_respects_budget():
    assert chunk_shape(8192, 128256, 1 << 27) == (8192, 16384)  # the H100 benchmark's shape
    for n, v, budget in [(1, 10, 4), (10 ** 6, 128256, 1 << 27), (48, 9000, 4096 * 8), (5, 3, 1000)]:
        rows, cols = chunk_shape(n, v, budget)
        assert 1 <= rows <= n and 1 <= cols <= v
        assert rows * cols <= max(budget, cols)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        linear_token_logprobs(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        linear_token_logprobs(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long))
