"""Device buffers of one generation session: the static KV cache, the decode state (lengths, input
tokens, done flags, counts, finish reasons, per-microbatch steps), preallocated outputs, and the
per-microbatch views a captured step reads and writes. Nothing is reallocated between steps or
between calls that reuse the session; ``reset`` refills the buffers in place."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

from ..generate import GenerationResult, _param_dtype
from .sampling import noise_keys
from .schedule import split_rows
from .step import StaticKVCache

FINISH_NAMES = {0: "length", 1: "eos", 2: "stop"}


class Session:
    def __init__(self, stage, batch: int, capacity: int, params, device, sampler):
        self.stage, self.device, self.capacity, self.sampler = stage, device, capacity, sampler
        layout = stage.layout
        dtype = _param_dtype(stage)
        self.cache = StaticKVCache(stage, batch, capacity, dtype=dtype, device=device)
        self.rows = split_rows(batch, min(layout.pp_size, batch))
        self.cache_rows = [self.cache.rows(r) for r in self.rows]
        long = dict(dtype=torch.long, device=device)
        width = params.max_new_tokens
        self.state = SimpleNamespace(
            tokens=torch.zeros(batch, **long), done=torch.zeros(batch, dtype=torch.bool, device=device),
            n_out=torch.zeros(batch, **long), finish=torch.zeros(batch, **long),
            out_tokens=torch.zeros(batch, width, **long),
            out_logp=torch.zeros(batch, width, dtype=torch.float32, device=device),
            stop=torch.tensor(sorted(set(params.eos_ids) | set(params.stop_ids)) or [-1], **long),
            eos=torch.tensor(params.eos_ids or [-1], **long))
        self.views = [SimpleNamespace(**{k: (v if k in ("stop", "eos") else v[r])
                                         for k, v in vars(self.state).items()}) for r in self.rows]
        self.lengths = torch.zeros(batch, **long)
        self.keys = torch.zeros(batch, **long)
        self.steps = torch.zeros(len(self.rows), **long)
        hidden = stage.cfg.hidden_size
        self.hidden_in = [torch.zeros(r.stop - r.start, hidden, dtype=dtype, device=device)
                          for r in self.rows]
        self.hidden_out: list = [None] * len(self.rows)
        self.graphs = None  # [(CUDAGraph, output)] per microbatch once captured
        self.prepared = False  # warmed up (compiled) and, with graphs, captured

    def reset(self, prompts, params, seq_offset: int):
        """Fill the buffers for a new batch (same size and settings) without reallocating them."""
        s = self.state
        for t in (s.tokens, s.n_out, s.finish, s.out_tokens, s.out_logp, self.steps):
            t.zero_()
        s.done.fill_(False)
        lengths = [len(p) for p in prompts]
        self.lengths.copy_(torch.tensor(lengths))
        seq_ids = torch.arange(seq_offset, seq_offset + len(prompts), device=self.device)
        self.keys.copy_(noise_keys(params.seed, seq_ids))
        self.cache.prefill_rows = torch.repeat_interleave(
            torch.arange(len(prompts)), torch.tensor(lengths)).to(self.device)

    def snapshot(self):
        s = self.state
        return [(t, t.clone()) for t in (s.tokens, s.done, s.n_out, s.finish, self.lengths,
                                         self.steps)]

    @staticmethod
    def restore(saved):
        for t, copy in saved:
            t.copy_(copy)

    def result(self) -> GenerationResult:
        """The last stage's outputs, broadcast over the pipeline and brought to the host in one
        transfer."""
        layout, s = self.stage.layout, self.state
        packed = torch.cat([s.out_tokens.double(), s.out_logp.double(), s.n_out[:, None].double(),
                            s.finish[:, None].double()], 1)
        if layout.pp_size > 1:
            dist.broadcast(packed, src=layout.stage_rank(layout.pp_size - 1), group=layout.pp_group)
        host = packed.cpu()
        width = s.out_tokens.shape[1]
        n_out = host[:, 2 * width].long().tolist()
        tokens = host[:, :width].long().tolist()
        logps = host[:, width:2 * width].float().tolist()
        return GenerationResult(
            output_ids=[t[:n] for t, n in zip(tokens, n_out)],
            logprobs=[lp[:n] for lp, n in zip(logps, n_out)],
            finish_reason=[FINISH_NAMES[int(f)] for f in host[:, 2 * width + 1].tolist()])
