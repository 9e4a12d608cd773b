"""Device buffers of one generation session: the static KV cache of its slots, the decode state
(per slot: input token, position, step, last step allowed, done flag, count, finish reason, outputs),
and the per-microbatch views a captured step reads and writes. Nothing is reallocated between steps,
between admissions or between calls that reuse the session: admitting a sequence rewrites its slot's
rows in place."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .forward import param_dtype
from .schedule import split_rows
from .shard_sampling import noise_keys, record_step
from .step import StaticKVCache

STATE_ROWS = ("tokens", "done", "n_out", "finish", "out_tokens", "out_logp", "step", "limit")


class Session:
    def __init__(self, stage, slots: int, capacity: int, params, device, sampler):
        self.stage, self.device, self.capacity, self.sampler = stage, device, capacity, sampler
        self.slots = slots
        layout = stage.layout
        dtype = param_dtype(stage)
        self.cache = StaticKVCache(stage, slots, capacity, dtype=dtype, device=device)
        self.rows = split_rows(slots, min(layout.pp_size, slots))
        self.cache_rows = [self.cache.rows(r) for r in self.rows]
        long = dict(dtype=torch.long, device=device)
        width = params.max_new_tokens
        self.state = SimpleNamespace(
            tokens=torch.zeros(slots, **long),
            done=torch.ones(slots, dtype=torch.bool, device=device),
            n_out=torch.zeros(slots, **long), finish=torch.zeros(slots, **long),
            out_tokens=torch.zeros(slots, width, **long),
            out_logp=torch.zeros(slots, width, dtype=torch.float32, device=device),
            step=torch.zeros(slots, **long),  # the next output column of each slot
            limit=torch.zeros(slots, **long),  # each slot's last output column
            stop=torch.tensor(sorted(set(params.eos_ids) | set(params.stop_ids)) or [-1], **long),
            eos=torch.tensor(params.eos_ids or [-1], **long))
        self.views = [SimpleNamespace(**{k: (v if k in ("stop", "eos") else v[r])
                                         for k, v in vars(self.state).items()}) for r in self.rows]
        self.lengths = torch.zeros(slots, **long)  # each slot's next position
        self.keys = torch.zeros(slots, **long)
        hidden = stage.cfg.hidden_size
        self.hidden_in = [torch.zeros(r.stop - r.start, hidden, dtype=dtype, device=device)
                          for r in self.rows]
        self.hidden_out: list = [None] * len(self.rows)
        self.graphs = None  # [(CUDAGraph, output)] per microbatch once captured
        self.prepared = False  # warmed up (compiled) and, with graphs, captured

    def reset(self):
        """Every slot free (done) for a new call, without reallocating anything."""
        s = self.state
        for t in (s.tokens, s.n_out, s.finish, s.step, s.limit, self.lengths):
            t.zero_()
        s.done.fill_(True)

    def start(self, slots, seq_ids, prompt_lengths, limits, seed: int):
        """Rows of newly admitted sequences: positions after their prompts, noise keys, caps; their
        state emptied (the first token is recorded by ``record_first``)."""
        idx = torch.tensor(slots, device=self.device)
        self.lengths[idx] = torch.tensor(prompt_lengths, device=self.device)
        self.keys[idx] = noise_keys(seed, torch.tensor(seq_ids, device=self.device))
        s = self.state
        for name in ("tokens", "n_out", "finish", "step", "out_tokens", "out_logp"):
            getattr(s, name)[idx] = 0
        s.limit[idx] = torch.tensor(limits, device=self.device) - 1
        s.done[idx] = False
        return idx

    def record_first(self, idx, tok, logp):
        """Step 0 of the sequences in slots ``idx`` (sampled from their prompts' last positions),
        recorded as a decode step records its own."""
        s = self.state
        rows = SimpleNamespace(**{k: getattr(s, k)[idx] for k in STATE_ROWS}, stop=s.stop, eos=s.eos)
        record_step(rows, tok, logp)
        for k in STATE_ROWS:
            getattr(s, k)[idx] = getattr(rows, k)

    def rows_of(self, slots) -> torch.Tensor:
        """Finished slots' outputs as one host tensor [n, 2·width + 2] (float64: tokens, log-probs,
        count, finish code), one device-to-host transfer."""
        s, idx = self.state, torch.tensor(slots, device=self.device)
        return torch.cat([s.out_tokens[idx].double(), s.out_logp[idx].double(),
                          s.n_out[idx, None].double(), s.finish[idx, None].double()], 1).cpu()

    def snapshot(self):
        """Copies of everything a decode step writes but the cache (whose writes land at each
        slot's next position, rewritten by the step that follows), for ``restore``."""
        s = self.state
        return [(t, t.clone()) for t in (s.tokens, s.done, s.n_out, s.finish, s.step, s.out_tokens,
                                         s.out_logp, self.lengths)]

    @staticmethod
    def restore(saved):
        for t, copy in saved:
            t.copy_(copy)
