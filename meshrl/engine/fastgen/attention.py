"""Decode attention over a static KV cache: append each sequence's new key/value at its own length,
then attend over the positions it may see.

Three forms (DESIGN invariant 5): ``attend_oracle`` (float64, tests), ``attend_torch`` (the CPU path:
SDPA over the whole capacity with a length mask, so its shapes never change), and the Triton kernel
(the CUDA path): one program per (sequence, KV head) holds that head's group of query heads and walks
only the cached positions below the sequence's length, read on the device, so a captured step reads
no more of the cache than the sequences fill. The new key/value stay in registers for their own
score and are stored for later steps; no program reads what another writes.

Given the step's rotary tables (``cos``/``sin``), ``attend`` takes the query and new key *before*
rotation: the kernel rotates them in registers (fp32, one rounding to the model dtype, as a compiled
``apply_rope`` does), which saves the decode step a separate rotary kernel per layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from meshrl.kernels.dispatch import use_triton

from ..model.attention import apply_rope


def uses_triton(x, backend=None) -> bool:
    """Whether ``attend`` takes the Triton kernel for tensors like ``x``."""
    return use_triton(x) if backend in (None, "auto") else backend == "triton"


def attend(q, k_new, v_new, k_cache, v_cache, lengths, *, window=None, backend=None, rope=None):
    """q [B, Hq, D]; k_new/v_new [B, Hkv, D]; caches [B, Hkv, capacity, D]; lengths [B] (the new
    token's position); ``rope`` None (q and k_new already rotated) or the step's (cos, sin)
    [B, D]. Writes the (rotated) new key/value into the caches; returns [B, Hq, D]."""
    if uses_triton(q, backend):
        return attend_triton(q, k_new, v_new, k_cache, v_cache, lengths, window=window, rope=rope)
    if rope is not None:
        q, k_new = apply_rope(q, *rope), apply_rope(k_new, *rope)
    return attend_torch(q, k_new, v_new, k_cache, v_cache, lengths, window=window)


def visible_mask(lengths, capacity, window):
    pos = torch.arange(capacity, device=lengths.device)
    visible = pos[None, :] <= lengths[:, None]
    if window is not None:
        visible &= pos[None, :] > lengths[:, None] - window
    return visible


def attend_torch(q, k_new, v_new, k_cache, v_cache, lengths, *, window=None):
    b = torch.arange(q.shape[0], device=q.device)
    k_cache[b, :, lengths] = k_new
    v_cache[b, :, lengths] = v_new
    visible = visible_mask(lengths, k_cache.shape[2], window)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k_cache, v_cache,
                                         attn_mask=visible[:, None, None, :],
                                         enable_gqa=k_cache.shape[1] != q.shape[1])
    return out.squeeze(2)


def attend_oracle(q, k_new, v_new, k_cache, v_cache, lengths, *, window=None):
    """Float64, one sequence and head at a time; writes the caches like the others."""
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


@triton.jit
def _decode_attention_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, len_ptr, o_ptr, cos_ptr, sin_ptr,
                             sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, sc_h, sc_n, so_b, so_h, sr_b,
                             scale, window,
                             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                             WINDOWED: tl.constexpr, ROPE: tl.constexpr, DOT_FP32: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    n_cached = tl.load(len_ptr + b).to(tl.int32)  # the new token's position
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gd_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    d_mask = d < HEAD_DIM
    heads = h * GROUP + g
    q_at = q_ptr + b * sq_b + heads[:, None] * sq_h
    k_at = kn_ptr + b * sk_b + h * sk_h
    q = tl.load(q_at + d[None, :], mask=gd_mask, other=0.0)
    k_new = tl.load(k_at + d, mask=d_mask, other=0.0)
    v_new = tl.load(vn_ptr + b * sv_b + h * sv_h + d, mask=d_mask, other=0.0)
    if ROPE:  # x·cos + rotate_half(x)·sin, rotate_half(x)[d] = -x[d + D/2] below D/2, x[d - D/2] above
        half = HEAD_DIM // 2
        partner = tl.where(d < half, d + half, d - half)
        sign = tl.where(d < half, -1.0, 1.0)
        cos = tl.load(cos_ptr + b * sr_b + d, mask=d_mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + b * sr_b + d, mask=d_mask, other=0.0).to(tl.float32) * sign
        q_p = tl.load(q_at + partner[None, :], mask=gd_mask, other=0.0).to(tl.float32)
        k_p = tl.load(k_at + partner, mask=d_mask, other=0.0).to(tl.float32)
        q = (q.to(tl.float32) * cos[None, :] + q_p * sin[None, :]).to(q.dtype)
        k_new = (k_new.to(tl.float32) * cos + k_p * sin).to(k_new.dtype)
    base = b.to(tl.int64) * sc_b + h * sc_h
    tl.store(kc_ptr + base + n_cached * sc_n + d, k_new, mask=d_mask)
    tl.store(vc_ptr + base + n_cached * sc_n + d, v_new, mask=d_mask)
    # The new token's own score starts the online softmax, so the running max is finite throughout.
    m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
    l_i = tl.full([BLOCK_G], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32) + v_new.to(tl.float32)[None, :]
    lo = 0
    if WINDOWED:
        lo = tl.maximum(n_cached + 1 - window, 0)
    # A while loop, not range(tensor): the interpreter cannot take a loaded scalar as a range bound
    # (see kernels/gae.py). Unpipelined is fine here: B·Hkv programs keep enough loads in flight.
    start = (lo // BLOCK_N) * BLOCK_N
    while start < n_cached:
        n = start + tl.arange(0, BLOCK_N)
        n_mask = (n < n_cached) & (n >= lo)
        offs = base + n[:, None] * sc_n + d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(kc_ptr + offs, mask=kv_mask, other=0.0)
        v = tl.load(vc_ptr + offs, mask=kv_mask, other=0.0)
        if DOT_FP32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_mask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_FP32:  # p rounded to the value dtype first, as on the native path
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
            acc = acc * alpha[:, None] + pv
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        start += BLOCK_N
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + heads[:, None] * so_h + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=gd_mask)


def kernel_meta(q, k_cache, window, rope: bool = False):
    """Block sizes and flags for the kernel (also used by the ahead-of-time compile test)."""
    group = q.shape[1] // k_cache.shape[1]
    d = q.shape[-1]
    return dict(GROUP=group, HEAD_DIM=d, BLOCK_G=max(16, triton.next_power_of_2(group)),
                BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_N=64, WINDOWED=window is not None,
                ROPE=rope, DOT_FP32=q.dtype == torch.float32 or _interpreted())


def _interpreted() -> bool:
    # The interpreter's tl.dot misreads bf16 operands (triton 3.6); exact fp32 products stand in.
    return isinstance(_decode_attention_kernel, InterpretedFunction)


def attend_triton(q, k_new, v_new, k_cache, v_cache, lengths, *, window=None, rope=None):
    cos, sin = rope if rope is not None else (q, q)  # unread without ROPE
    for t in (q, k_new, v_new, k_cache, v_cache, cos, sin):
        if t.stride(-1) != 1:
            raise ValueError("decode attention needs the head dimension contiguous")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("decode attention needs the K and V caches laid out alike")
    if rope is not None and (cos.shape != (q.shape[0], q.shape[-1]) or cos.stride() != sin.stride()):
        raise ValueError("decode attention needs cos and sin as [batch, head_dim], laid out alike")
    bsz, n_kv = q.shape[0], k_cache.shape[1]
    out = torch.empty_like(q)
    _decode_attention_kernel[(bsz, n_kv)](
        q, k_new, v_new, k_cache, v_cache, lengths, out, cos, sin,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        cos.stride(0), 1.0 / math.sqrt(q.shape[-1]), 0 if window is None else int(window),
        **kernel_meta(q, k_cache, window, rope is not None), num_warps=4)
    return out
