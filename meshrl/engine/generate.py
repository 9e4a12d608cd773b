"""Generation with a KV cache, under any tp/pp layout (the straightforward version: one decoding
step at a time through the pipeline). It is the reference the fast engine (``fastgen``: static cache,
CUDA graphs, pipelined microbatches, sharded sampling) must reproduce; ``generate`` picks one.

Prompts are prefilled packed (no padding); each decoding step feeds one token per sequence. The last
stage samples on the full vocabulary (gathered over tp), and the chosen tokens go back to every stage.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from meshrl.parallel import mappings

from .model.attention import PackedMeta, varlen_causal_attention
from .sampling import SamplingParams, sample_tokens


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


@dataclass
class GenerationResult:
    output_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reason: list[str]


def stage_pass(stage, ids, meta, cache=None, hidden_shape=None, forward=None):
    """One forward pass through the pipeline without autograd bookkeeping; the last stage returns
    its hidden states, other stages None. ``hidden_shape`` defaults to [N, hidden]; ``forward``
    (default: the stage itself) is called as ``forward(ids, meta, cache)``."""
    hidden_shape = hidden_shape or (ids.numel(), stage.cfg.hidden_size)
    layout = stage.layout
    if not layout.is_first_stage:
        x = torch.empty(hidden_shape, dtype=_param_dtype(stage), device=ids.device)
        dist.recv(x, src=layout.stage_rank(layout.pp_rank - 1), group=layout.pp_group)
        stage.set_input_tensor(x)
    h = (forward or stage)(ids, meta, cache)
    if not layout.is_last_stage:
        dist.send(h.contiguous(), dst=layout.stage_rank(layout.pp_rank + 1), group=layout.pp_group)
        return None
    return h


def _param_dtype(stage):
    return next(stage.parameters()).dtype


def _full_logits(stage, h):
    logits = mappings.all_gather_dim(stage.logits(h), -1, stage.layout.tp_group)
    return logits[:, :stage.cfg.vocab_size]


def _broadcast_from_last(t: torch.Tensor, layout):
    if layout.pp_size > 1:
        dist.broadcast(t, src=layout.stage_rank(layout.pp_size - 1), group=layout.pp_group)
    return t


ENGINES = ("auto", "fast", "reference")


def choose_engine(stage, engine: str | None = None) -> str:
    """``engine`` or ``MESHRL_GENERATE`` (read per call), default auto: the fast engine where the
    stage's parameters are CUDA tensors (its graphs and kernels are CUDA's) and the stage runs
    without sequence parallelism, the reference elsewhere."""
    choice = (engine or os.environ.get("MESHRL_GENERATE", "") or "auto").strip().lower()
    if choice not in ENGINES:
        raise ValueError(f"generation engine {choice!r}: use one of {ENGINES}")
    if choice == "auto":
        fast = next(stage.parameters()).is_cuda and not stage.sequence_parallel
        return "fast" if fast else "reference"
    return choice


def generate(stage, prompts: list[list[int]], params: SamplingParams, *, seq_offset: int = 0,
             device=None, engine: str | None = None) -> GenerationResult:
    """Continue each prompt; every rank of the model replica calls this with the same prompts.

    ``seq_offset`` is the global index of ``prompts[0]`` (data-parallel replicas pass their offset),
    which keys the sampling noise so the tokens do not depend on the layout. Both engines give the
    same tokens (and log-probs to fp32 rounding) on CPU; see ``choose_engine``."""
    with generator(stage, engine) as gen:
        return gen(prompts, params, seq_offset=seq_offset, device=device)


@contextlib.contextmanager
def generator(stage, engine: str | None = None):
    """``generate`` for many batches of one stage, as ``gen(prompts, params, seq_offset=,
    device=)``. The fast engine keeps its session (static cache, captured graphs) from batch to
    batch, so a rollout of many batches captures once, and frees it on leaving the block, before
    training needs the memory."""
    if choose_engine(stage, engine) == "fast":
        from .fastgen import FastGenerator, FastOptions
        # one session at a time: a smaller last batch replaces the full batches' cache rather
        # than holding a second one beside it
        fast = FastGenerator(stage, FastOptions(max_sessions=1))
        try:
            yield fast.generate
        finally:
            fast.release()
    else:
        yield functools.partial(generate_reference, stage)


@torch.no_grad()
def generate_reference(stage, prompts: list[list[int]], params: SamplingParams, *,
                       seq_offset: int = 0, device=None) -> GenerationResult:
    """The straightforward engine: one step at a time, full-vocabulary sampling on the last stage."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if stage.head != "lm":
        raise ValueError("generate needs a model with an LM head")
    layout = stage.layout
    device = device if device is not None else stage.inv_freq.device
    B, H = len(prompts), stage.cfg.hidden_size
    lengths = [len(p) for p in prompts]
    cache = KVCache(stage, B, max(lengths) + params.max_new_tokens, dtype=_param_dtype(stage),
                    device=device)
    seq_ids = torch.arange(seq_offset, seq_offset + B, device=device)
    stop = torch.tensor(sorted(set(params.eos_ids) | set(params.stop_ids)) or [-1], device=device)
    eos = torch.tensor(params.eos_ids or [-1], device=device)
    ban = sorted(set(params.eos_ids) | set(params.stop_ids))

    meta = PackedMeta.from_lengths(lengths, device=device)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    h = stage_pass(stage, ids, meta, cache, (ids.numel(), H))
    last = (meta.cu_seqlens[1:] - 1).long()
    cache.lengths = torch.tensor(lengths, device=device)
    cache.prefill = False

    out_tokens = torch.zeros(B, params.max_new_tokens, dtype=torch.long, device=device)
    out_logp = torch.zeros(B, params.max_new_tokens, dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_out = torch.zeros(B, dtype=torch.long, device=device)
    finish = torch.zeros(B, dtype=torch.long, device=device)  # 0 length, 1 eos, 2 stop
    for step in range(params.max_new_tokens):
        tok = torch.zeros(B, dtype=torch.long, device=device)
        logp = torch.zeros(B, dtype=torch.float32, device=device)
        if layout.is_last_stage:
            hs = h[last] if step == 0 else h
            tok, logp = sample_tokens(_full_logits(stage, hs), params, seq_ids, step,
                                      ban_ids=ban if step < params.min_new_tokens else None)
        _broadcast_from_last(tok, layout)
        _broadcast_from_last(logp, layout)
        live = ~done
        out_tokens[live, step] = tok[live]
        out_logp[live, step] = logp[live]
        n_out += live.long()
        hit = live & torch.isin(tok, stop)
        finish[hit] = torch.where(torch.isin(tok[hit], eos), 1, 2)
        done |= hit
        if bool(done.all()) or step == params.max_new_tokens - 1:
            break
        meta = PackedMeta(torch.arange(B + 1, dtype=torch.int32, device=device), 1, cache.lengths.clone())
        h = stage_pass(stage, tok, meta, cache, (B, H))
        cache.lengths += 1
    return _to_result(out_tokens, out_logp, n_out, finish)


def _to_result(tokens, logps, n_out, finish) -> GenerationResult:
    names = {0: "length", 1: "eos", 2: "stop"}
    tokens, logps, n_out, finish = tokens.cpu(), logps.cpu(), n_out.cpu(), finish.cpu()
    return GenerationResult(
        output_ids=[tokens[b, :n_out[b]].tolist() for b in range(tokens.shape[0])],
        logprobs=[logps[b, :n_out[b]].tolist() for b in range(tokens.shape[0])],
        finish_reason=[names[int(f)] for f in finish])

