"""Sampling on vocabulary shards, with the same tokens as ``sampling.sample_tokens`` on the gathered
logits, and each row's step as a device tensor so a captured decode step can advance it.

Under tp, each rank computes for its columns the Gumbel-max winner (noise keyed by the *global* token
index), the max and sum-exp of the scaled logits and the scaled logit at its winner; one all-gather
of these five numbers per row picks the global winner (first maximum, as ``argmax`` over the full row
would) and combines the log-sum-exp. Top-k gathers each shard's k largest values (k·tp per row) to
find the k-th; top-p with top-k runs the nucleus over those candidates. Top-p without top-k needs the
whole sorted distribution, so that case gathers the full logits (as the reference engine does).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from meshrl.parallel import mappings

from .sampling import _MASK32, SamplingParams, _mix32, filter_logits, kth_largest

NEG_INF = float("-inf")


@dataclass(frozen=True)
class ShardSampler:
    """What one rank needs to sample from its vocabulary columns [start, start + columns)."""

    greedy: bool
    temperature: float  # the log-prob temperature (1 for greedy), as in ``SamplingParams``
    top_k: int
    top_p: float
    min_new_tokens: int
    ban_ids: tuple[int, ...]
    vocab_size: int  # unpadded, global
    start: int
    columns: int  # this shard's width, padding included
    valid: int  # this shard's columns below vocab_size

    @staticmethod
    def build(params: SamplingParams, vocab_size: int, start: int = 0, columns: int | None = None):
        columns = vocab_size if columns is None else columns
        ban = tuple(sorted(set(params.eos_ids) | set(params.stop_ids))) if params.min_new_tokens else ()
        return ShardSampler(greedy=params.greedy, temperature=params.logprob_temperature,
                            top_k=params.top_k, top_p=params.top_p,
                            min_new_tokens=params.min_new_tokens, ban_ids=ban, vocab_size=vocab_size,
                            start=start, columns=columns,
                            valid=max(0, min(start + columns, vocab_size) - start))

    @property
    def uses_top_k(self) -> bool:
        return bool(self.top_k) and self.top_k < self.vocab_size

    def needs_full_gather(self, tp: int) -> bool:
        return tp > 1 and not self.greedy and self.top_p < 1.0 and not self.uses_top_k

    def gathered(self) -> "ShardSampler":
        return dataclasses.replace(self, start=0, columns=self.vocab_size, valid=self.vocab_size)


def column_tables(s: ShardSampler, device):
    """Per-column constants a sampler reads every step: the column's term of the noise hash, banned
    columns, padded columns."""
    cols = torch.arange(s.start, s.start + s.columns, dtype=torch.int64, device=device)
    banned = torch.isin(cols, torch.tensor(list(s.ban_ids) or [-1], device=device))
    return (cols * 0x2C1B3C6D) & _MASK32, banned, cols >= s.vocab_size


def noise_keys(seed: int, seq_ids: torch.Tensor) -> torch.Tensor:
    """The (seed, sequence) part of ``gumbel_noise``'s hash, once per generation: int64 [B]."""
    h = _mix32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=seq_ids.device) ^ 0x9E3779B9)
    return _mix32(h ^ (seq_ids.to(torch.int64) & _MASK32))


def gumbel_columns(keys: torch.Tensor, step: torch.Tensor, column_keys: torch.Tensor) -> torch.Tensor:
    """``gumbel_noise`` restricted to some columns, bit for bit: float64 [B, columns]."""
    h = _mix32(keys ^ ((step * 0x632BE5AB) & _MASK32))
    bits = _mix32(h[:, None] ^ column_keys[None, :])
    u = (bits.double() + 0.5) / 2.0**32
    return -torch.log(-torch.log(u))


class Sampler:
    """``shard_sample`` with its tables built once (a captured step may not create tensors from host
    data). ``fn`` is ``shard_sample`` or a compiled version of it."""

    def __init__(self, params: SamplingParams, vocab_size: int, start: int, columns: int, group,
                 device, fn=None):
        if vocab_size + columns >= 2**24:  # token ids travel through the all-gather as fp32
            raise ValueError(f"vocab_size={vocab_size}: sharded sampling supports up to 2^24 tokens")
        self.group, self.fn = group, fn or shard_sample
        self.spec = ShardSampler.build(params, vocab_size, start, columns)
        self.full = self.spec.needs_full_gather(mappings.group_size(group))
        if self.full:
            self.spec = self.spec.gathered()
        self.tables = column_tables(self.spec, device)

    def __call__(self, logits, keys, step, *, eager=False):
        if self.full:
            logits = mappings.all_gather_dim(logits.contiguous(), -1, self.group)
            logits = logits[:, :self.spec.vocab_size]
        fn = shard_sample if eager else self.fn
        return fn(logits, keys, step, *self.tables, self.spec, None if self.full else self.group)


def shard_sample(logits, keys, step, column_keys, banned, padded, s: ShardSampler, group=None):
    """logits [B, columns] of this shard (padded columns may hold anything) -> (tokens [B] int64,
    log-probs [B] fp32), equal on every rank of ``group`` and to ``sample_tokens`` on the gathered
    logits. ``step`` is int64, each row's [B] (or one for all, 0-dim); nothing here reads a device
    value on the host."""
    tp = mappings.group_size(group)
    scaled = logits.float() / s.temperature
    if s.valid < s.columns:
        scaled = scaled.masked_fill(padded, NEG_INF)
    choice = scaled
    if s.ban_ids:
        choice = choice.masked_fill(banned & (step < s.min_new_tokens)[..., None], NEG_INF)
    if not s.greedy:
        choice = _filter(choice, s, group) + gumbel_columns(keys, step, column_keys).float()
    best = torch.argmax(choice, dim=-1, keepdim=True)
    # log-sum-exp pieces: exp(x - m) with m = -inf (an all-padding shard) would be NaN
    m = scaled.amax(-1, keepdim=True)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    total = torch.exp(scaled - m_safe).sum(-1, keepdim=True)
    at = scaled.gather(-1, best)
    if tp == 1:
        return best.squeeze(-1), ((at - m) - torch.log(total)).squeeze(-1)
    stats = torch.cat([choice.gather(-1, best), (best + s.start).float(), at, m, total], -1)
    return _combine(mappings.all_gather_dim(stats[None], 0, group))


def _combine(g):
    """g [tp, B, 5] of per-shard (winner score, winner id, its scaled logit, max, sum-exp)."""
    win = torch.argmax(g[..., 0], dim=0, keepdim=True)  # first maximum: the lowest global index
    pick = g.gather(0, win[..., None].expand(1, -1, 5)).squeeze(0)
    m = g[..., 3].amax(0)
    m_safe = torch.where(torch.isinf(g[..., 3]), torch.zeros_like(g[..., 3]), g[..., 3])
    total = (g[..., 4] * torch.exp(m_safe - m)).sum(0)
    return pick[:, 1].long(), (pick[:, 2] - m) - torch.log(total)


def _filter(choice, s: ShardSampler, group):
    """``filter_logits`` on a shard: entries the full-row filter would drop become -inf."""
    if mappings.group_size(group) == 1:
        return filter_logits(choice, s.top_k if s.uses_top_k else 0, s.top_p)
    if not s.uses_top_k:
        return choice  # top-p alone was routed to the full gather
    # The union of every shard's k largest holds the row's k largest, so their k-th is the row's.
    vals = torch.topk(choice, min(s.top_k, s.columns), dim=-1, sorted=False).values
    cands = mappings.all_gather_dim(vals, -1, group)
    kth = kth_largest(cands, s.top_k)
    choice = choice.masked_fill(choice < kth, NEG_INF)
    if s.top_p < 1.0:
        # Every value the top-k filter keeps is a candidate, in the same descending order as in
        # the full row, so the nucleus over the candidates keeps the same ones.
        kept = filter_logits(cands.masked_fill(cands < kth, NEG_INF), 0, s.top_p)
        low = torch.where(torch.isinf(kept), torch.full_like(kept, float("inf")), kept).amin(-1, True)
        choice = choice.masked_fill(choice < low, NEG_INF)
    return choice


def record_step(state, tok, logp):
    """Bookkeeping after sampling one step, in place on device buffers (as the reference loop does,
    but each row at its own ``state.step``): its output column, count, finish reason and done flag
    (a stop token, or the row's last column ``state.limit``), then the live rows' steps advance. A
    finished (or free) row records nothing."""
    live = ~state.done
    col = state.step.clamp(max=state.out_tokens.shape[1] - 1)[:, None]
    state.out_tokens.scatter_(1, col, torch.where(live[:, None], tok[:, None],
                                                  state.out_tokens.gather(1, col)))
    state.out_logp.scatter_(1, col, torch.where(live[:, None], logp[:, None],
                                                state.out_logp.gather(1, col)))
    state.n_out.add_(live.long())
    # explicit comparisons, not isin: CUDA's isin sorts (and syncs) once the id list is long
    hit = live & (tok[:, None] == state.stop).any(-1)
    kind = torch.where((tok[:, None] == state.eos).any(-1), 1, 2)
    state.finish.copy_(torch.where(hit, kind, state.finish))
    state.done.logical_or_(hit | (live & (state.step >= state.limit)))
    state.tokens.copy_(tok)
    state.step.add_(live.long())
