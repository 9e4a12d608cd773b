"""The reference engine: generation with a KV cache under any tp/pp layout, one decoding step at a
time through the pipeline, every sequence of a batch in lock step. It is what the fast engine
(``fast.py``: slots refilled as sequences finish, shared prompt prefixes, static cache, CUDA graphs,
pipelined microbatches, sharded sampling) must reproduce; ``generate.generate`` picks one.

Prompts are prefilled packed (no padding); each decoding step feeds one token per sequence. The last
stage samples on the full vocabulary (gathered over tp), and the chosen tokens go back to every stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from meshrl.parallel.pipeline import fill_from_last_stage

from ..model.attention import PackedMeta, varlen_causal_attention
from .forward import full_logits, param_dtype, stage_pass
from .lockstep import agree_all, agree_max
from .outputs import GenerationResult, to_result
from .sampling import SamplingParams, sample_tokens
from .sequences import Sequences


class KVCache:
    """Per-layer K/V of B sequences, [B, capacity, kv_heads, head_dim]; ``lengths`` tokens filled."""

    def __init__(self, stage, batch: int, capacity: int, *, dtype, device):
        self.k, self.v = {}, {}
        for idx, layer in stage.model.layers.items():
            attn = layer.self_attn
            shape = (batch, capacity, attn.n_kv, attn.head_dim)
            self.k[int(idx)] = torch.zeros(shape, dtype=dtype, device=device)
            self.v[int(idx)] = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity = capacity
        self.prefill = True

    def attend(self, layer_idx, q, k, v, meta: PackedMeta, *, window=None):
        if self.prefill:
            return self._prefill(layer_idx, q, k, v, meta, window)
        return self._decode(layer_idx, q, k, v, window)

    def _prefill(self, layer_idx, q, k, v, meta, window):
        seq = torch.repeat_interleave(torch.arange(len(meta.lengths), device=q.device),
                                      torch.tensor(meta.lengths, device=q.device))
        self.k[layer_idx][seq, meta.position_ids] = k
        self.v[layer_idx][seq, meta.position_ids] = v
        return varlen_causal_attention(q, k, v, meta, window=window)

    def _decode(self, layer_idx, q, k, v, window):
        """q/k/v [B, heads, D]: one new token per sequence at position ``lengths``."""
        b = torch.arange(q.shape[0], device=q.device)
        self.k[layer_idx][b, self.lengths] = k
        self.v[layer_idx][b, self.lengths] = v
        span = int(self.lengths.max()) + 1
        keys = self.k[layer_idx][:, :span].transpose(1, 2)  # [B, kv, L, D]
        vals = self.v[layer_idx][:, :span].transpose(1, 2)
        pos = torch.arange(span, device=q.device)
        visible = pos[None, :] <= self.lengths[:, None]
        if window is not None:
            visible &= pos[None, :] > self.lengths[:, None] - window
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, vals,
                                             attn_mask=visible[:, None, None, :],
                                             enable_gqa=keys.shape[1] != q.shape[1])
        return out.squeeze(2)


@torch.no_grad()
def generate_reference(stage, prompts: list[list[int]], params: SamplingParams, *,
                       seq_offset: int = 0, device=None, limits=None) -> GenerationResult:
    """One sequence per prompt, keyed ``seq_offset + i``, all in lock step: prefill them packed,
    then one step at a time with full-vocabulary sampling on the last stage. ``limits``: per
    sequence, new tokens at most (default ``params.max_new_tokens``)."""
    seqs = Sequences.build(prompts, params.max_new_tokens, limits=limits)
    if stage.head != "lm":
        raise ValueError("generate needs a model with an LM head")
    layout = stage.layout
    device = device if device is not None else stage.inv_freq.device
    B, H = len(prompts), stage.cfg.hidden_size
    lengths = [len(p) for p in prompts]
    # under ep the replicas of a group step together until the last of their sequences ends
    width = agree_max([max(seqs.limits)], layout, device)[0]
    cache = KVCache(stage, B, max(lengths) + width, dtype=param_dtype(stage), device=device)
    seq_ids = torch.arange(seq_offset, seq_offset + B, device=device)
    last_step = torch.tensor(seqs.limits, device=device) - 1
    stop = torch.tensor(sorted(set(params.eos_ids) | set(params.stop_ids)) or [-1], device=device)
    eos = torch.tensor(params.eos_ids or [-1], device=device)
    ban = sorted(set(params.eos_ids) | set(params.stop_ids))

    meta = PackedMeta.from_lengths(lengths, device=device)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    h = stage_pass(stage, ids, meta, cache, (ids.numel(), H))
    last = (meta.cu_seqlens[1:] - 1).long()
    cache.lengths = torch.tensor(lengths, device=device)
    cache.prefill = False

    out_tokens = torch.zeros(B, width, dtype=torch.long, device=device)
    out_logp = torch.zeros(B, width, dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_out = torch.zeros(B, dtype=torch.long, device=device)
    finish = torch.zeros(B, dtype=torch.long, device=device)  # FINISH_NAMES' codes
    for step in range(width):
        tok = torch.zeros(B, dtype=torch.long, device=device)
        logp = torch.zeros(B, dtype=torch.float32, device=device)
        if layout.is_last_stage:
            hs = h[last] if step == 0 else h
            tok, logp = sample_tokens(full_logits(stage, hs), params, seq_ids, step,
                                      ban_ids=ban if step < params.min_new_tokens else None)
        fill_from_last_stage(tok, layout)
        fill_from_last_stage(logp, layout)
        live = ~done
        out_tokens[live, step] = tok[live]
        out_logp[live, step] = logp[live]
        n_out += live.long()
        hit = live & torch.isin(tok, stop)
        finish[hit] = torch.where(torch.isin(tok[hit], eos), 1, 2)
        done |= hit | (live & (last_step <= step))
        if agree_all(bool(done.all()), layout, device):
            break
        meta = PackedMeta(torch.arange(B + 1, dtype=torch.int32, device=device), 1, cache.lengths.clone())
        h = stage_pass(stage, tok, meta, cache, (B, H))
        cache.lengths += 1
    return to_result(out_tokens, out_logp, n_out, finish)
