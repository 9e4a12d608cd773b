"""Float64 oracles for the kernels: the plainest possible formulas, for tests only."""
from __future__ import annotations

import math

import torch


def gae_oracle(rewards, values, cu_seqlens, bootstrap=None, gamma=1.0, lam=1.0):
    """Per-timestep Python loop over each sequence, in float64."""
    r, v = rewards.double().cpu(), values.double().cpu()
    adv = torch.zeros_like(r)
    cu = [int(c) for c in cu_seqlens]
    for b in range(len(cu) - 1):
        v_next = 0.0 if bootstrap is None else float(bootstrap[b])
        a_next = 0.0
        for t in reversed(range(cu[b], cu[b + 1])):
            a_next = float(r[t]) + gamma * v_next - float(v[t]) + gamma * lam * a_next
            adv[t] = a_next
            v_next = float(v[t])
    return adv, adv + v


def logprob_oracle(logits, labels, temperature=1.0, vocab_size=None):
    """(logp, entropy) of float64 log_softmax over the real vocabulary; differentiable."""
    z = logits.double() / temperature
    if vocab_size is not None and vocab_size < z.shape[1]:
        pad = torch.full_like(z[:, vocab_size:], float("-inf"))
        z = torch.cat([z[:, :vocab_size], pad], 1)
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    return logp.gather(1, labels.long()[:, None]).squeeze(1), ent


def oracle_grads(fn, inputs, upstream):
    """Gradients of Σ upstream_k·output_k with respect to float64 copies of `inputs`."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    outs = fn(*leaves)
    loss = sum((o * u.double()).sum() for o, u in zip(outs, upstream))
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], [torch.nan_to_num(g, nan=0.0) for g in grads]


def logprob_oracle_analytic(logits, labels, up_lp, up_ent, temperature=1.0, vocab_size=None, rows=64):
    """(logp, entropy, grad) with the textbook derivatives, in float64, a few rows at a time.

    The autograd oracle above is too slow for 1269×32000 on two cores; this one is checked against
    it on small shapes (test_logprobs.py), then stands in for it on large ones.
    d logp/dz_j = [j = label] − p_j;  dH/dz_j = −p_j·(log p_j + H);  z = logits / T.
    """
    n, v = logits.shape
    real = v if vocab_size is None else min(v, vocab_size)
    logp_out, ent_out = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    grad = torch.zeros(n, v, dtype=torch.float64)
    for r0 in range(0, n, rows):
        sl = slice(r0, r0 + rows)
        logp = torch.log_softmax(logits[sl, :real].double() / temperature, -1)
        p = logp.exp()
        plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
        ent = -plogp.sum(-1)
        lab = labels[sl].long()
        logp_out[sl] = logp.gather(1, lab[:, None]).squeeze(1)
        ent_out[sl] = ent
        g = -p * up_lp[sl, None].double() - up_ent[sl, None].double() * (plogp + p * ent[:, None])
        g[torch.arange(len(lab)), lab] += up_lp[sl].double()
        grad[sl, :real] = g / temperature
    return logp_out, ent_out, grad


def assert_within(got, want, *, atol, rtol):
    """|got − want| <= atol + rtol·|want| everywhere (assert_close is slow on 40M elements)."""
    got = got.detach().cpu().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    excess = (got - want).abs() - (atol + rtol * want.abs())
    worst = int(excess.argmax()) if excess.numel() else 0
    assert not torch.isnan(got).any(), "NaN in result"
    assert excess.numel() == 0 or excess.flatten()[worst] <= 0, (
        f"at flat index {worst}: got {got.flatten()[worst].item():.8g}, want "
        f"{want.flatten()[worst].item():.8g} (atol={atol}, rtol={rtol})")


def decode_attention_oracle(q, k_new, v_new, k_cache, v_cache, lengths, *, window=None):
    """Decode attention (meshrl/kernels/decode_attention.py) in float64, one sequence and head at a
    time; writes the new key/value into the caches as the kernel does."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(lengths[b])
        k_cache[b, :, n], v_cache[b, :, n] = k_new[b], v_new[b]
        lo = 0 if window is None else max(0, n + 1 - window)
        for h in range(q.shape[1]):
            keys = k_cache[b, h // group, lo:n + 1].double()
            vals = v_cache[b, h // group, lo:n + 1].double()
            w = torch.softmax(keys @ q[b, h].double() / math.sqrt(q.shape[-1]), 0)
            out[b, h] = w @ vals
    return out
