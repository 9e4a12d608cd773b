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
    adv = _reverse_linear_scan(a, b, max_len)
    return adv, adv + v


_SCAN_BLOCK = 32


def _reverse_linear_scan(a: torch.Tensor, b: torch.Tensor, max_len: int) -> torch.Tensor:
    """x_t = b_t + a_t·x_{t+1} (x past the end = 0) where no chain of nonzero a_t spans max_len.

    Blocked: a back-to-front loop over the 32 positions of every block at once (vector ops across
    blocks), the recurrence between block starts by doubling, then one fix-up. Work stays O(L)
    and Python steps stay ~32 + log2(L/32) whatever the lengths.
    """
    n, k = b.numel(), _SCAN_BLOCK
    if n <= 4 * k:
        return _doubling_scan(a, b, max_len)
    m = -(-n // k)
    a_blk = torch.nn.functional.pad(a, (0, m * k - n)).view(m, k).T.contiguous()  # [k, m]
    b_blk = torch.nn.functional.pad(b, (0, m * k - n)).view(m, k).T.contiguous()
    for j in range(k - 2, -1, -1):  # in-block suffixes: b_j + a_j·(...), and the product of a
        b_blk[j].addcmul_(a_blk[j], b_blk[j + 1])
        a_blk[j].mul_(a_blk[j + 1])
    starts = _doubling_scan(a_blk[0].clone(), b_blk[0].clone(), -(-max_len // k) + 1)
    after = torch.zeros_like(starts)
    after[:-1] = starts[1:]  # x entering each block from the next one
    return b_blk.addcmul_(a_blk, after).T.reshape(-1)[:n]


def _doubling_scan(a: torch.Tensor, b: torch.Tensor, span: int) -> torch.Tensor:
    # Hillis-Steele: after the step with stride d, (a_t, b_t) compose the window [t, t+2d). Only
    # multiplies, so γλ < 1 underflows harmlessly to 0 where cumprod-and-divide would blow up.
    # Ping-pong buffers: fresh multi-MB allocations per step cost more than the arithmetic on CPU.
    a_out, b_out = torch.empty_like(a), torch.empty_like(b)
    d = 1
    while d < span:
        torch.addcmul(b[:-d], a[:-d], b[d:], out=b_out[:-d])
        torch.mul(a[:-d], a[d:], out=a_out[:-d])
        b_out[-d:], a_out[-d:] = b[-d:], a[-d:]
        a, a_out, b, b_out = a_out, a, b_out, b
        d *= 2
    return b


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
