"""Vocab-parallel log-probs and data-parallel whitening on gloo ranks against unsharded runs."""
import pytest
import torch
import torch.distributed as dist

from meshrl.kernels import linear_token_logprobs, masked_whiten, token_logprobs

from oracles import assert_within, logprob_oracle, oracle_grads

# Sharding only regroups fp32 sums (per-rank partials, then the combine), so sharded and unsharded
# results agree to a few fp32 roundings.
REGROUP = dict(atol=2e-5, rtol=1e-5)


def _shard(t, dim=0):
    rank, world = dist.get_rank(), dist.get_world_size()
    size = t.shape[dim] // world
    return t.narrow(dim, rank * size, size).clone()


def _rank_token_logprobs(logits, labels, up, temperature, vocab_size):
    x = _shard(logits, 1).requires_grad_()
    lp, ent = token_logprobs(x, labels, temperature=temperature, return_entropy=True,
                             tp_group=dist.group.WORLD, vocab_size=vocab_size)
    (lp * up[0] + ent * up[1]).sum().backward()
    return lp, ent, x.grad


def _rank_linear(hidden, weight, labels, up, vocab_size, chunk):
    h = hidden.clone().requires_grad_()
    w = _shard(weight, 0).requires_grad_()
    lp, ent = linear_token_logprobs(h, w, labels, return_entropy=True, tp_group=dist.group.WORLD,
                                    vocab_size=vocab_size, max_chunk_elems=chunk)
    (lp * up[0] + ent * up[1]).sum().backward()
    return lp, ent, h.grad, w.grad


def _rank_whiten(xs, masks, shift_mean):
    rank = dist.get_rank()
    return masked_whiten(xs[rank], masks[rank], group=dist.group.WORLD, shift_mean=shift_mean)


def _inputs(n, v, seed, real=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 3
    labels = torch.randint(0, real or v, (n,), generator=g)
    return logits, labels, [torch.randn(n, generator=g), torch.randn(n, generator=g)]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("vocab_size,pad", [
    (None, 0),
    (997, 0),  # padded to 1000: the last rank holds 3 padding columns of garbage
    (None, 3),  # padding columns already -inf in the logits
    (740, 0),  # on 4 ranks the last rank holds nothing but padding
])
def test_vocab_parallel_token_logprobs(dist_pool, world, vocab_size, pad):
    real = vocab_size or 1000 - pad
    logits, labels, up = _inputs(37, 1000, seed=world, real=real)
    if pad:
        logits[:, -pad:] = float("-inf")
    results = dist_pool(world).run(_rank_token_logprobs, logits, labels, up, 0.8, vocab_size)

    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, labels, temperature=0.8, return_entropy=True, vocab_size=vocab_size)
    (lp * up[0] + ent * up[1]).sum().backward()
    for r_lp, r_ent, _ in results:  # every rank holds the full, unsharded answer
        torch.testing.assert_close(r_lp, lp.detach(), **REGROUP)
        torch.testing.assert_close(r_ent, ent.detach(), **REGROUP)
    torch.testing.assert_close(torch.cat([g for *_, g in results], 1), x.grad, **REGROUP)

    (o_lp, o_ent), (o_grad,) = oracle_grads(
        lambda z: logprob_oracle(z, labels, 0.8, vocab_size), [logits], up)
    assert_within(results[0][0], o_lp, atol=5e-5, rtol=1e-5)
    assert_within(results[-1][1], o_ent, atol=5e-5, rtol=1e-5)
    assert_within(torch.cat([g for *_, g in results], 1), o_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("chunk", [None, 3000])
def test_vocab_parallel_linear_token_logprobs(dist_pool, world, chunk):
    g = torch.Generator().manual_seed(10 + world)
    hidden = torch.randn(29, 16, generator=g)
    weight = torch.randn(1000, 16, generator=g) / 2
    vocab_size = 998
    labels = torch.randint(0, vocab_size, (29,), generator=g)
    up = [torch.randn(29, generator=g), torch.randn(29, generator=g)]
    results = dist_pool(world).run(_rank_linear, hidden, weight, labels, up, vocab_size, chunk)

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    lp, ent = linear_token_logprobs(h, w, labels, return_entropy=True, vocab_size=vocab_size)
    (lp * up[0] + ent * up[1]).sum().backward()
    for r_lp, r_ent, _, _ in results:
        torch.testing.assert_close(r_lp, lp.detach(), **REGROUP)
        torch.testing.assert_close(r_ent, ent.detach(), **REGROUP)
    # Each rank's hidden gradient is its partial sum; the caller's all-reduce makes the whole.
    torch.testing.assert_close(sum(r[2] for r in results), h.grad, **REGROUP)
    torch.testing.assert_close(torch.cat([r[3] for r in results]), w.grad, **REGROUP)
    assert (results[-1][3][-2:] == 0).all()  # padded weight rows


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whitening_across_ranks_equals_whitening_gathered_data(dist_pool, shift_mean):
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(13, generator=g) * 3 + 1, torch.randn(4, 5, generator=g) - 2]
    masks = [torch.rand(13, generator=g) > 0.3, torch.rand(4, 5, generator=g) > 0.5]
    results = dist_pool(2).run(_rank_whiten, xs, masks, shift_mean)
    whole = masked_whiten(torch.cat([xs[0], xs[1].flatten()]),
                          torch.cat([masks[0], masks[1].flatten()]), shift_mean=shift_mean)
    torch.testing.assert_close(torch.cat([results[0], results[1].flatten()]), whole)
    # And the statistics really are global: one rank alone would whiten differently.
    assert not torch.allclose(results[0], masked_whiten(xs[0], masks[0], shift_mean=shift_mean))
