"""Decode attention over a static KV cache: append each sequence's new key/value at its own length,
then attend over the positions it may see.

Three forms (every kernel's, docs/architecture.md): a float64 oracle (tests/kernels/oracles.py),
``attend_torch`` (the CPU path: SDPA over the whole capacity with a length mask, so its shapes never
change), and the Triton kernel (the CUDA path): one program per (sequence, KV head) holds that
head's group of query heads and walks only the cached positions below the sequence's length, read on
the device, so a captured step reads no more of the cache than the sequences fill. The new
key/value stay in registers for their own score and are stored for later steps; no program reads
what another writes.

When batch × KV heads programs would leave SMs idle (small batches, heads sharded by tp), each
(sequence, KV head)'s visible blocks are dealt out to up to ``MAX_SPLITS`` programs (flash-decoding):
each writes an unnormalised partial (running max, sum, weighted values) and a second kernel merges
them. The split count is fixed by the shapes, so a captured step keeps it; the blocks per split
follow the lengths on the device.

Given the step's rotary tables (``cos``/``sin``), ``attend`` takes the query and new key *before*
rotation: the kernel rotates them in registers (fp32, one rounding to the model dtype, as a compiled
``rotate`` does), which saves the decode step a separate rotary kernel per layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .dispatch import use_triton

BLOCK_N = 64  # cached positions per block
NUM_WARPS = 4
# Splitting a (sequence, KV head)'s positions across programs (flash-decoding) pays when batch ×
# KV heads leaves SMs idle (small batches, tp-sharded heads); each split walks at least
# MIN_SPLIT_BLOCKS blocks of a full cache, and there are at most MAX_SPLITS.
MAX_SPLITS = 16
MIN_SPLIT_BLOCKS = 2
COMBINE_META = ("GROUP", "HEAD_DIM", "BLOCK_G", "BLOCK_D", "SPLITS")


def uses_triton(x, backend=None) -> bool:
    """Whether ``attend`` takes the Triton kernel for tensors like ``x``."""
    return use_triton(x) if backend in (None, "auto") else backend == "triton"


def attend(q, k_new, v_new, k_cache, v_cache, lengths, *, window=None, backend=None, rope=None,
           splits=None, block_n=BLOCK_N, num_warps=NUM_WARPS):
    """q [B, Hq, D]; k_new/v_new [B, Hkv, D]; caches [B, Hkv, capacity, D]; lengths [B] (the new
    token's position); ``rope`` None (q and k_new already rotated) or the step's (cos, sin)
    [B, D]. Writes the (rotated) new key/value into the caches; returns [B, Hq, D]. ``splits``
    (Triton only): programs per (sequence, KV head), None to choose from the device; ``block_n``
    and ``num_warps`` (Triton only): cached positions per loop step and warps per program. Every length
    must be below the capacity: the engine sizes the cache so, and checking here would sync."""
    if uses_triton(q, backend):
        return attend_triton(q, k_new, v_new, k_cache, v_cache, lengths, window=window, rope=rope,
                             splits=splits, block_n=block_n, num_warps=num_warps)
    if rope is not None:
        q, k_new = rotate(q, *rope), rotate(k_new, *rope)
    return attend_torch(q, k_new, v_new, k_cache, v_cache, lengths, window=window)


def rotate(x, cos, sin):
    """Rotary embedding of x [B, heads, D] by the tables cos/sin [B, D]: x·cos + rotate_half(x)·sin,
    rotate_half(x) = (−x[D/2:], x[:D/2]) (the torch path's rotation; the kernel does it in registers)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


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


@triton.jit
def _decode_attention_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, len_ptr, o_ptr, cos_ptr, sin_ptr,
                             acc_ptr, ml_ptr,
                             sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, sc_h, sc_n, so_b, so_h, sr_b,
                             scale, window,
                             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                             WINDOWED: tl.constexpr, ROPE: tl.constexpr, DOT_FP32: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
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
    first = split == 0
    if first:  # split 0 appends the new key/value and starts from the new token's own score
        tl.store(kc_ptr + base + n_cached * sc_n + d, k_new, mask=d_mask)
        tl.store(vc_ptr + base + n_cached * sc_n + d, v_new, mask=d_mask)
    # Split 0 starts the online softmax from the new token's own score, so its running max is finite
    # throughout; the other splits start empty and, as each block they walk holds a visible
    # position, are finite after their first block.
    own = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
    m_i = tl.where(first, own, float("-inf"))
    l_i = tl.where(first, 1.0, 0.0) + tl.zeros([BLOCK_G], tl.float32)
    acc = tl.where(first, 1.0, 0.0) * (tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
                                       + v_new.to(tl.float32)[None, :])
    lo = 0
    if WINDOWED:
        lo = tl.maximum(n_cached + 1 - window, 0)
    # The visible blocks are dealt out to the splits in equal runs, sized from this sequence's
    # length on the device (a captured step keeps its grid while the lengths grow).
    first_block = lo // BLOCK_N
    n_blocks = (n_cached + BLOCK_N - 1) // BLOCK_N - first_block
    per_split = (n_blocks + SPLITS - 1) // SPLITS
    start = (first_block + split * per_split) * BLOCK_N
    stop = tl.minimum(start + per_split * BLOCK_N, n_cached)
    # A while loop, not range(tensor): the interpreter cannot take a loaded scalar as a range bound
    # (see kernels/gae.py). Unpipelined is fine here: B·Hkv·splits programs keep loads in flight.
    while start < stop:
        n = start + tl.arange(0, BLOCK_N)
        n_mask = (n < stop) & (n >= lo)
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
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * so_b + heads[:, None] * so_h + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=gd_mask)
    else:  # unnormalised partials, [B, Hkv, SPLITS, GROUP(, HEAD_DIM)], merged by _combine_kernel
        row = ((b.to(tl.int64) * tl.num_programs(1) + h) * SPLITS + split) * GROUP + g
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=gd_mask)
        n_rows = tl.num_programs(0) * tl.num_programs(1) * SPLITS * GROUP
        tl.store(ml_ptr + row, m_i, mask=g < GROUP)
        tl.store(ml_ptr + n_rows + row, l_i, mask=g < GROUP)


@triton.jit
def _combine_kernel(acc_ptr, ml_ptr, o_ptr, so_b, so_h,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                    BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    """out = Σ_s e^(m_s − M)·acc_s / Σ_s e^(m_s − M)·l_s, M = max_s m_s (finite: split 0's is)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    gd_mask = g_mask[:, None] & (d[None, :] < HEAD_DIM)
    n_rows = tl.num_programs(0) * tl.num_programs(1) * SPLITS * GROUP
    first_row = (b.to(tl.int64) * tl.num_programs(1) + h) * SPLITS * GROUP + g
    m_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s in tl.static_range(SPLITS):
        m_max = tl.maximum(m_max, tl.load(ml_ptr + first_row + s * GROUP, mask=g_mask, other=0.0))
    num = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_G], tl.float32)
    for s in tl.static_range(SPLITS):
        row = first_row + s * GROUP
        w = tl.exp(tl.load(ml_ptr + row, mask=g_mask, other=0.0) - m_max)
        den += w * tl.load(ml_ptr + n_rows + row, mask=g_mask, other=1.0)
        num += w[:, None] * tl.load(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=gd_mask,
                                    other=0.0)
    heads = h * GROUP + g
    tl.store(o_ptr + b * so_b + heads[:, None] * so_h + d[None, :],
             (num / den[:, None]).to(o_ptr.dtype.element_ty), mask=gd_mask)


def kernel_meta(q, k_cache, window, rope: bool = False, splits: int = 1, block_n: int = BLOCK_N):
    """Block sizes and flags for the kernel (also used by the ahead-of-time compile test)."""
    group = q.shape[1] // k_cache.shape[1]
    d = q.shape[-1]
    return dict(GROUP=group, HEAD_DIM=d, BLOCK_G=max(16, triton.next_power_of_2(group)),
                BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_N=block_n, SPLITS=splits,
                WINDOWED=window is not None, ROPE=rope,
                DOT_FP32=q.dtype == torch.float32 or _interpreted())


def choose_splits(programs: int, capacity: int, sm_count: int) -> int:
    """How many programs share one (sequence, KV head)'s positions: enough for about two programs
    per SM, each walking at least MIN_SPLIT_BLOCKS blocks of a full cache, at most MAX_SPLITS."""
    fill = -(-2 * sm_count // programs)
    return max(1, min(fill, MAX_SPLITS, capacity // (MIN_SPLIT_BLOCKS * BLOCK_N)))


def auto_splits(k_cache) -> int:
    """``choose_splits`` for a cache [B, Hkv, capacity, D] on its device: 1 off CUDA (the
    interpreter gains nothing from splits)."""
    if not k_cache.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(k_cache.device).multi_processor_count
    return choose_splits(k_cache.shape[0] * k_cache.shape[1], k_cache.shape[2], sms)


def _interpreted() -> bool:
    # The interpreter's tl.dot misreads bf16 operands (triton 3.6); exact fp32 products stand in.
    return isinstance(_decode_attention_kernel, InterpretedFunction)


def attend_triton(q, k_new, v_new, k_cache, v_cache, lengths, *, window=None, rope=None,
                  splits=None, block_n=BLOCK_N, num_warps=NUM_WARPS):
    cos, sin = rope if rope is not None else (q, q)  # unread without ROPE
    for t in (q, k_new, v_new, k_cache, v_cache, cos, sin):
        if t.stride(-1) != 1:
            raise ValueError("decode attention needs the head dimension contiguous")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("decode attention needs the K and V caches laid out alike")
    if rope is not None and (cos.shape != (q.shape[0], q.shape[-1]) or cos.stride() != sin.stride()):
        raise ValueError("decode attention needs cos and sin as [batch, head_dim], laid out alike")
    if window is not None and window < 1:
        raise ValueError(f"attention window={window}: a sliding window holds at least 1 position")
    splits = auto_splits(k_cache) if splits is None else int(splits)
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"attention splits={splits}: use 1 to {MAX_SPLITS} (None chooses)")
    check_launch(block_n, num_warps)
    return launch(q, k_new, v_new, k_cache, v_cache, lengths, window, rope, splits,
                  block_n=block_n, num_warps=num_warps)


def check_launch(block_n: int, num_warps: int) -> None:
    """Block sizes Triton takes (tl.arange needs a power of two; tl.dot at least 16 rows)."""
    if block_n not in (16, 32, 64, 128, 256):
        raise ValueError(f"attention block_n={block_n}: use 16, 32, 64, 128 or 256")
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"attention num_warps={num_warps}: use 1, 2, 4, 8 or 16")


def launch(q, k_new, v_new, k_cache, v_cache, lengths, window, rope, splits, *, block_n=BLOCK_N,
           num_warps=NUM_WARPS):
    """The kernels on checked inputs; ``block_n`` and ``num_warps`` are open to benchmarks."""
    cos, sin = rope if rope is not None else (q, q)  # unread without ROPE
    bsz, n_kv = q.shape[0], k_cache.shape[1]
    out = torch.empty_like(q)
    meta = kernel_meta(q, k_cache, window, rope is not None, splits, block_n)
    acc = ml = out  # unread with one split
    if splits > 1:
        acc = torch.empty(bsz, q.shape[1] * splits, q.shape[-1], dtype=torch.float32, device=q.device)
        ml = torch.empty(2, bsz, q.shape[1] * splits, dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(bsz, n_kv, splits)](
        q, k_new, v_new, k_cache, v_cache, lengths, out, cos, sin, acc, ml,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        cos.stride(0), 1.0 / math.sqrt(q.shape[-1]), 0 if window is None else int(window),
        **meta, num_warps=num_warps)
    if splits > 1:
        _combine_kernel[(bsz, n_kv)](acc, ml, out, out.stride(0), out.stride(1),
                                     **{k: meta[k] for k in COMBINE_META}, num_warps=num_warps)
    return out
