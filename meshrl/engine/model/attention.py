"""Rotary embeddings and causal attention over packed sequences.

Packed: tokens of B sequences are concatenated into one [N, heads, head_dim] tensor, and
``cu_seqlens`` (int32 [B+1]) marks the boundaries. On CUDA a varlen flash kernel runs all sequences
at once; on CPU (where that op does not exist) SDPA runs over blocks of whole sequences, each with
its block-diagonal causal mask (`DENSE_BLOCK_TOKENS`).
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig


@dataclass
class PackedMeta:
    """Boundaries of a packed batch. ``max_seqlen`` stays on the host, so the attention kernels need
    no device-to-host read."""

    cu_seqlens: torch.Tensor  # int32 [B+1]
    max_seqlen: int
    position_ids: torch.Tensor  # [N] position of each token within its sequence

    @staticmethod
    def from_lengths(lengths, device=None) -> "PackedMeta":
        lengths = [int(n) for n in lengths]
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        pos = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
        return PackedMeta(cu.to(device), max(lengths, default=0), pos.to(device))

    @property
    def lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind != "llama3":
        return inv
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling.get("original_max_position_embeddings", cfg.max_position_embeddings))
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype):
    """cos/sin [N, head_dim] for each token's position, computed in fp32 like the reference."""
    freqs = position_ids.float()[:, None] * inv_freq.to(position_ids.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@functools.cache
def _varlen_kwargs_style():
    """The varlen op's signature moved between torch releases; adapt instead of pinning one."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return {"fn": varlen_attn, "is_causal": "is_causal" in params,
            "window": "window_size" in params, "gqa": "enable_gqa" in params}


def _expand_kv(k, n_heads):
    return k if k.shape[1] == n_heads else k.repeat_interleave(n_heads // k.shape[1], dim=1)


def varlen_causal_attention(q, k, v, meta: PackedMeta, *, window: int | None = None):
    """q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D], causal within each sequence."""
    # the flash varlen kernel takes half precision only; fp32 (parity checks) goes through SDPA
    flash = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    style = _varlen_kwargs_style() if flash else None
    if style is not None and (window is None or style["window"]):
        kw = {}
        if style["window"]:
            kw["window_size"] = (-1 if window is None else window - 1, 0)
        elif style["is_causal"]:
            kw["is_causal"] = True
        if style["gqa"]:
            kw["enable_gqa"] = k.shape[1] != q.shape[1]
        else:
            k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        cu = meta.cu_seqlens.to(q.device, torch.int32)
        return style["fn"](q, k, v, cu, cu, meta.max_seqlen, meta.max_seqlen, **kw)
    return _blocked_sdpa(q, k, v, meta.cu_seqlens.tolist(), window)


# Many short sequences (RL responses) make a per-sequence SDPA loop slow on CPU, and one SDPA with
# an N×N block-diagonal mask over a whole microbatch costs N² (two thirds of a CPU PPO step at
# N = 2,800). Consecutive sequences are grouped into blocks of at most this many tokens, and the
# blocks run as one batched SDPA, each with its block-diagonal causal mask: N·DENSE_BLOCK_TOKENS.
# A longer sequence runs on its own (plain causal SDPA).
DENSE_BLOCK_TOKENS = 256


def _blocked_sdpa(q, k, v, starts, window):
    """``starts``: the sequences' boundaries (cu_seqlens as a list)."""
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    if sum(1 for n in lengths if n) <= 1:  # no or one sequence: nothing to block
        return _per_sequence_sdpa(q, k, v, lengths, window)
    blocks, cur, filled, long = [], [], 0, []  # blocks: lists of sequence indices
    for i, n in enumerate(lengths):
        if cur and (n > DENSE_BLOCK_TOKENS or filled + n > DENSE_BLOCK_TOKENS):
            blocks.append(cur)  # a block holds consecutive tokens
            cur, filled = [], 0
        if n > DENSE_BLOCK_TOKENS:
            long.append(i)
        elif n:
            cur.append(i)
            filled += n
    if cur:
        blocks.append(cur)
    out = torch.empty_like(q) if long else None
    if blocks:
        width = max(sum(lengths[j] for j in b) for b in blocks)
        # token index of each (block, slot), the sequence it belongs to (-1: padding) and its
        # position in the block; padding attends to padding only, so no row is fully masked
        index = torch.zeros(len(blocks), width, dtype=torch.long)
        seq = torch.full((len(blocks), width), -1, dtype=torch.long)
        for g, b in enumerate(blocks):
            lo, hi = starts[b[0]], starts[b[-1] + 1]
            index[g, :hi - lo] = torch.arange(lo, hi)
            seq[g, :hi - lo] = torch.repeat_interleave(torch.tensor(b), torch.tensor([lengths[j] for j in b]))
        index, seq = index.to(q.device), seq.to(q.device)
        pos = torch.arange(width, device=q.device)
        mask = (seq[:, :, None] == seq[:, None, :]) & (pos[None, None, :] <= pos[None, :, None])
        if window is not None:
            mask &= pos[None, :, None] - pos[None, None, :] < window
        qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))  # [blocks, heads, width, dim]
        res = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[:, None],
                                             enable_gqa=k.shape[1] != q.shape[1])
        res = res.transpose(1, 2).reshape(-1, *q.shape[1:])
        valid = (seq >= 0).reshape(-1).nonzero().squeeze(1)  # block order is token order
        if out is None:
            return res.index_select(0, valid)
        tokens = index.reshape(-1).index_select(0, valid)
        out[tokens] = res.index_select(0, valid)
    for i in long:
        sl = slice(starts[i], starts[i + 1])
        out[sl] = _per_sequence_sdpa(q[sl], k[sl], v[sl], [lengths[i]], window)
    return out


def _per_sequence_sdpa(q, k, v, lengths, window):
    out = torch.empty_like(q)
    start = 0
    gqa = k.shape[1] != q.shape[1]
    for n in lengths:
        if n == 0:
            continue
        sl = slice(start, start + n)
        qs, ks, vs = (t[sl].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        mask = None
        if window is not None and n > window:
            i = torch.arange(n, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=gqa)
        out[sl] = o.squeeze(0).transpose(0, 1)
        start += n
    return out
