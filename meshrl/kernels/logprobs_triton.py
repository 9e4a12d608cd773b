"""Triton kernels for token log-probs and entropy: per-row partial statistics and the logits gradient.

One program per row walks the vocabulary in wide blocks with an online max / sum-exp, loading the
logits in their own dtype and doing the arithmetic in fp32 (base 2, so each element costs one exp2).
Statistics leave the kernels in natural-log units so the torch path and the combine step agree.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Kernels may only read globals that are constexpr.
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(LOG2E)
# Finite stand-in for an empty running max: (m - m_new)·s stays 0·finite instead of -inf·0 = NaN.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _stats_kernel(x_ptr, lab_ptr, o0_ptr, o1_ptr, o2_ptr, o3_ptr, stride, n_valid, offset, scale,
                  FINALIZE: tl.constexpr, BLOCK: tl.constexpr, N_BLOCKS: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    cols = tl.arange(0, BLOCK)
    m = tl.full((), _NEG_BIG, tl.float32)  # running max, base-2 units
    s = tl.zeros((), tl.float32)  # Σ 2^(x - m)
    t = tl.zeros((), tl.float32)  # Σ 2^(x - m)·(x - m), relative to m so entropy avoids cancellation
    # The next block is loaded before this one is reduced, so its memory latency overlaps the
    # reductions (the compiler does not pipeline loads that feed no dot).
    nxt = tl.load(base + cols, mask=cols < n_valid, other=float("-inf"))
    for i in range(0, N_BLOCKS):
        x = nxt.to(tl.float32) * scale
        c = (i + 1) * BLOCK + cols
        nxt = tl.load(base + c, mask=c < n_valid, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        alpha = tl.exp2(m - m_new)
        d = x - m_new
        e = tl.exp2(d)
        # e == 0 exactly where x is -inf (padded vocab): e·d would be 0·(-inf) = NaN.
        t = alpha * (t + (m - m_new) * s) + tl.sum(e * tl.where(e > 0, d, 0.0), 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    lab = tl.load(lab_ptr + row) - offset
    own = (lab >= 0) & (lab < n_valid)
    zl = tl.load(base + lab, mask=own, other=0.0).to(tl.float32) * scale
    zl = tl.where(own, zl, 0.0)
    if FINALIZE:
        log2s = tl.log2(s)
        lse = (m + log2s) * _LN2
        tl.store(o0_ptr + row, zl * _LN2 - lse)
        tl.store(o1_ptr + row, (log2s - t / s) * _LN2)
        tl.store(o2_ptr + row, lse)
    else:
        tl.store(o0_ptr + row, m * _LN2)
        tl.store(o1_ptr + row, s)
        tl.store(o2_ptr + row, t * _LN2)
        tl.store(o3_ptr + row, zl * _LN2)


@triton.jit
def _grad_kernel(x_ptr, lab_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, gx_ptr, stride, g_stride,
                 n_valid, n_cols, offset, scale, inv_t, BLOCK: tl.constexpr, N_BLOCKS: tl.constexpr):
    # d logp/dz_j = [j = label] − p_j;  d H/dz_j = −p_j·(log p_j + H);  z = x / T.
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    gbase = gx_ptr + row.to(tl.int64) * g_stride
    lse2 = tl.load(lse_ptr + row) * _LOG2E
    ent = tl.load(ent_ptr + row)
    glp = tl.load(glp_ptr + row).to(tl.float32)
    gent = tl.load(gent_ptr + row).to(tl.float32)
    lab = tl.load(lab_ptr + row) - offset
    cols = tl.arange(0, BLOCK)
    nxt = tl.load(base + cols, mask=cols < n_valid, other=float("-inf"))  # prefetch, as above
    for i in range(0, N_BLOCKS):
        c = i * BLOCK + cols
        x = nxt.to(tl.float32) * scale
        nxt = tl.load(base + c + BLOCK, mask=c + BLOCK < n_valid, other=float("-inf"))
        l2 = x - lse2
        p = tl.exp2(l2)
        g = -p * (glp + gent * (tl.where(p > 0, l2 * _LN2, 0.0) + ent))
        g = tl.where(c == lab, g + glp, g)
        tl.store(gbase + c, (g * inv_t).to(gx_ptr.dtype.element_ty), mask=c < n_cols)


# The trip count is a constexpr because the interpreter cannot use a runtime scalar as a range bound
# under numpy 2.4. A model's vocabulary gives one or two distinct counts: one or two compiles.
def _launch_config(n_cols: int, device: torch.device, block: int | None, num_warps: int | None):
    if device.type == "cpu":
        # The interpreter pays per block op, not per element: the widest blocks run fastest.
        return block or min(32768, triton.next_power_of_2(max(n_cols, 16))), num_warps or 4
    # H100 sweep (8192 x 128256 bf16, benchmarks/kernels.py): 4096 columns with 8 warps ran the
    # forward in 0.718 ms against 0.820 ms for 8192/16, the backward unchanged (1.46 vs 1.45 ms)
    block = block or min(4096, triton.next_power_of_2(max(n_cols, 16)))
    return block, num_warps or (8 if block >= 2048 else 4)


def row_stats(logits: torch.Tensor, labels: torch.Tensor, inv_t: float, offset: int, n_valid: int, *,
              finalize: bool, block: int | None = None, num_warps: int | None = None):
    """[4, N] partials (max, sum-exp, Σ e·(z−max), label logit), or with `finalize` the tuple
    (logp, entropy, lse) of separate [N] tensors (separate so autograd outputs are not views)."""
    n = logits.shape[0]
    if finalize:
        outs = [torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3)]
        ptrs, result = outs + outs[-1:], tuple(outs)
    else:
        result = torch.empty((4, n), dtype=torch.float32, device=logits.device)
        ptrs = result.unbind(0)
    if n == 0:
        return result
    block, warps = _launch_config(n_valid, logits.device, block, num_warps)
    _stats_kernel[(n,)](logits, labels, *ptrs, logits.stride(0), n_valid, offset, inv_t * LOG2E,
                        FINALIZE=finalize, BLOCK=block, N_BLOCKS=triton.cdiv(n_valid, block),
                        num_warps=warps)
    return result


def logits_grad(logits, labels, lse, ent, g_lp, g_ent, inv_t: float, offset: int, n_valid: int, *,
                block: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Gradient of Σ g_lp·logp + g_ent·H with respect to `logits`, in the logits' dtype."""
    n, n_cols = logits.shape
    grad = torch.empty((n, n_cols), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad
    if logits.device.type != "cpu":
        # the gradient pass streams read+write and prefers wider blocks (H100 sweep: 16384 columns,
        # 16 warps 1.43 ms against 1.46 ms at the forward's 4096/8)
        block = block or min(16384, triton.next_power_of_2(max(n_cols, 16)))
        num_warps = num_warps or (16 if block >= 8192 else 8 if block >= 2048 else 4)
    block, warps = _launch_config(n_cols, logits.device, block, num_warps)
    _grad_kernel[(n,)](logits, labels, lse, ent, g_lp, g_ent, grad, logits.stride(0), grad.stride(0),
                       n_valid, n_cols, offset, inv_t * LOG2E, inv_t, BLOCK=block,
                       N_BLOCKS=triton.cdiv(n_cols, block), num_warps=warps)
    return grad
