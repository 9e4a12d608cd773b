"""Generalised advantage estimation over packed action tokens.

δ_t = r_t + γ·V_{t+1} − V_t (V after a sequence's last action = its bootstrap value, 0 by default),
A_t = δ_t + γλ·A_{t+1}, returns = A + V; fp32 out for any input dtype.

Both paths treat the packed stream as one reverse linear recurrence A_t = δ_t + a_t·A_{t+1} whose
coefficient a_t is γλ inside a sequence and 0 at its last action, so sequences never leak into each
other. GAE has no backward (advantages are targets), so there is no autograd.Function layer here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import use_triton


def gae(rewards: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor, *,
        bootstrap_values: torch.Tensor | None = None, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both fp32 [T], for packed rewards/values [T] and cu_seqlens [B+1]."""
    if rewards.shape != values.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} must be "
                         "the same 1D shape")
    n_seq = cu_seqlens.numel() - 1
    if bootstrap_values is not None and bootstrap_values.numel() != n_seq:
        raise ValueError(f"bootstrap_values has {bootstrap_values.numel()} entries for {n_seq} sequences")
    if use_triton(rewards, values, cu_seqlens):
        return _gae_triton(rewards, values, cu_seqlens, bootstrap_values, float(gamma), float(lam))
    return _gae_torch(rewards, values, cu_seqlens, bootstrap_values, float(gamma), float(lam))


# --- torch path -------------------------------------------------------------------------------------

def _gae_torch(rewards, values, cu_seqlens, bootstrap, gamma, lam):
    r = rewards.float()
    v = values.float()
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    last = (cu[1:] - 1)[lens > 0]
    v_next = torch.zeros_like(v)
    v_next[:-1] = v[1:]
    boot = (torch.zeros(lens.numel(), device=v.device) if bootstrap is None
            else bootstrap.float().reshape(-1))
    v_next[last] = boot[lens > 0]
    b = r + gamma * v_next - v
    a = torch.full_like(v, gamma * lam)
    a[last] = 0.0
    max_len = int(lens.max()) if lens.numel() else 0
    # Hillis-Steele doubling: after the step with stride d, (a_t, b_t) compose the window [t, t+2d).
    # log2(max_len) vector steps instead of a Python step per token, and only multiplies, so
    # γλ < 1 underflows harmlessly to 0 where a cumprod-and-divide scheme would blow up.
    d = 1
    while d < max_len:
        b_new = b.clone()
        b_new[:-d].addcmul_(a[:-d], b[d:])
        a_new = a.clone()
        a_new[:-d].mul_(a[d:])
        a, b = a_new, b_new
        d *= 2
    return b, b + v


# --- Triton path: kernel, host function -------------------------------------------------------------

@triton.jit
def _affine_compose(a_later, b_later, a_cur, b_cur):
    # x -> b_cur + a_cur * (b_later + a_later * x)
    return a_later * a_cur, b_cur + a_cur * b_later


@triton.jit
def _gae_kernel(r_ptr, v_ptr, boot_ptr, cu_ptr, adv_ptr, ret_ptr, gamma, gamma_lam,
                HAS_BOOT: tl.constexpr, BLOCK: tl.constexpr):
    seq = tl.program_id(0)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    boot = 0.0
    if HAS_BOOT:
        boot = tl.load(boot_ptr + seq).to(tl.float32)
    j = tl.arange(0, BLOCK)
    carry = tl.zeros((), dtype=tl.float32)  # A just past the current block (0 past the sequence end)
    # Blocks walk from the sequence end and are loaded back to front, so a forward scan runs the
    # reverse recurrence; `associative_scan(reverse=True)` is avoided because non-commutative
    # combines have come out wrong with it (triton-lang/triton#4362). A while loop, not
    # range(tensor): the interpreter cannot take a loaded scalar as a range bound under numpy 2.4.
    hi = end
    while hi > start:
        t = hi - 1 - j
        ok = t >= start
        r = tl.load(r_ptr + t, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t, mask=ok, other=0.0).to(tl.float32)
        v_next = tl.load(v_ptr + t + 1, mask=ok & (t + 1 < end), other=0.0).to(tl.float32)
        v_next = tl.where(t + 1 == end, boot, v_next)
        delta = tl.where(ok, r + gamma * v_next - v, 0.0)
        coef = tl.where(ok, gamma_lam, 0.0)
        a_sc, b_sc = tl.associative_scan((coef, delta), 0, _affine_compose)
        adv = b_sc + a_sc * carry
        tl.store(adv_ptr + t, adv, mask=ok)
        tl.store(ret_ptr + t, adv + v, mask=ok)
        n_ok = tl.minimum(hi - start, BLOCK)
        carry = tl.sum(tl.where(j == n_ok - 1, adv, 0.0), 0)
        hi -= BLOCK


def _gae_triton(rewards, values, cu_seqlens, bootstrap, gamma, lam):
    adv = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    n_seq = cu_seqlens.numel() - 1
    if n_seq <= 0 or rewards.numel() == 0:
        return adv, ret
    # 1024 covers a typical response in one block. The interpreter scans a custom combine one element
    # at a time in Python, masked lanes included, so narrow blocks waste less there.
    block = 128 if rewards.device.type == "cpu" else 1024
    boot = bootstrap.reshape(-1) if bootstrap is not None else cu_seqlens  # placeholder pointer
    _gae_kernel[(n_seq,)](rewards.contiguous(), values.contiguous(), boot, cu_seqlens.contiguous(),
                          adv, ret, gamma, gamma * lam, HAS_BOOT=bootstrap is not None,
                          BLOCK=block, num_warps=4)
    return adv, ret
