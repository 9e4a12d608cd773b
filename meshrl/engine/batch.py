"""Packed batches: sequences concatenated into 1D tensors with ``cu_seqlens``; no padding.

Per-token fields are aligned with the input tokens; the training label of position t is token t+1,
and the last position of each sequence has none (label 0, masked). Per-sequence fields have one
entry per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .model.attention import PackedMeta


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [N] long
    meta: PackedMeta
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # [N] each
    seqs: dict[str, torch.Tensor] = field(default_factory=dict)  # [B] each

    @property
    def num_seqs(self) -> int:
        return self.meta.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device) -> "PackedBatch":
        meta = PackedMeta(self.meta.cu_seqlens.to(device), self.meta.max_seqlen,
                          self.meta.position_ids.to(device))
        return PackedBatch(self.input_ids.to(device), meta,
                           {k: v.to(device) for k, v in self.tokens.items()},
                           {k: v.to(device) for k, v in self.seqs.items()})

    @staticmethod
    def empty() -> "PackedBatch":
        """No sequences, no fields: a microbatch that keeps expert-parallel replicas in step (a
        real one always holds a sequence)."""
        return PackedBatch(torch.zeros(0, dtype=torch.long),
                           PackedMeta(torch.zeros(1, dtype=torch.int32), 0,
                                      torch.zeros(0, dtype=torch.long)))

    def last_index(self) -> torch.Tensor:
        """Position of each sequence's last token [B]."""
        return (self.meta.cu_seqlens[1:] - 1).long()


def pack(seqs: list[list[int]], *, loss_from: list[int] | None = None,
         token_fields: dict[str, list] | None = None, seq_fields: dict[str, list] | None = None,
         pad_to_multiple: int = 1) -> PackedBatch:
    """Pack token lists. ``loss_from[b]`` is the first position of sequence b whose *next* token is
    trained on (its prompt length − 1); ``labels`` and ``loss_mask`` come from it (all positions by
    default). ``token_fields`` values are per-sequence lists aligned with that sequence's tokens.
    ``pad_to_multiple`` appends one masked filler sequence so N divides (sequence parallelism)."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("pack: empty sequence")
    lengths = [len(s) for s in seqs]
    fill = (-sum(lengths)) % pad_to_multiple
    ids = torch.tensor([t for s in seqs for t in s] + [0] * fill, dtype=torch.long)
    meta = PackedMeta.from_lengths(lengths + ([fill] if fill else []))
    labels = torch.zeros_like(ids)
    mask = torch.zeros(ids.numel(), dtype=torch.float32)
    starts = meta.cu_seqlens[:-1].tolist()
    for b, (s, n) in enumerate(zip(starts, lengths)):
        labels[s:s + n - 1] = ids[s + 1:s + n]
        first = 0 if loss_from is None else max(0, loss_from[b])
        mask[s + first:s + n - 1] = 1.0
    tokens = {"labels": labels, "loss_mask": mask}
    for name, values in (token_fields or {}).items():
        flat = [float(v) for seq in values for v in seq] + [0.0] * fill
        tokens[name] = torch.tensor(flat, dtype=torch.float32)
    seqs_t = {name: torch.tensor(list(v) + [0] * bool(fill)) for name, v in (seq_fields or {}).items()}
    seqs_t["real"] = torch.tensor([1.0] * len(seqs) + [0.0] * bool(fill))
    return PackedBatch(ids, meta, tokens, seqs_t)


def split_even(items: list, parts: int) -> list[list]:
    """Split into ``parts`` contiguous chunks whose sizes differ by at most one."""
    n = len(items)
    return [items[i * n // parts:(i + 1) * n // parts] for i in range(parts)]


def split_by_tokens(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy contiguous grouping of sequence indices into microbatches of at most ``max_tokens``
    (a longer sequence gets a microbatch of its own)."""
    groups, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if cur and used + n > max_tokens:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups
