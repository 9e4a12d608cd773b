"""ShardSpec: which slice of a full parameter one rank holds. The single source of truth for
loading, saving, checkpoints and reallocation; nothing re-derives sharding from parameter names."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    """This rank's piece of the logical (unpadded) tensor ``full_shape``.

    ``dim`` is the split dimension (None: replicated). The local tensor covers indices
    ``[start, stop)`` along ``dim``; indices at or past ``full_shape[dim]`` are padding (a vocabulary
    padded to a multiple of tp), which is never loaded, saved or transferred.
    """

    name: str
    full_shape: tuple[int, ...]
    dim: int | None = None
    start: int = 0
    stop: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "full_shape", tuple(int(s) for s in self.full_shape))
        if self.dim is None:
            object.__setattr__(self, "start", 0)
            object.__setattr__(self, "stop", None)
        elif self.stop is None:
            object.__setattr__(self, "stop", self.full_shape[self.dim])

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        shape = list(self.full_shape)
        shape[self.dim] = self.stop - self.start
        return tuple(shape)

    @property
    def valid_stop(self) -> int:
        """End of the real (non-padding) indices this rank holds along ``dim``."""
        return min(self.stop, self.full_shape[self.dim])

    @property
    def valid_len(self) -> int:
        return max(0, self.valid_stop - self.start)

    def full_index(self) -> tuple[slice, ...]:
        """Index into the full tensor selecting this rank's real (non-padding) data."""
        idx = [slice(None)] * len(self.full_shape)
        if self.dim is not None:
            idx[self.dim] = slice(self.start, self.valid_stop)
        return tuple(idx)

    def local_valid_index(self) -> tuple[slice, ...]:
        """Index into the local tensor selecting its real (non-padding) data."""
        idx = [slice(None)] * len(self.full_shape)
        if self.dim is not None:
            idx[self.dim] = slice(0, self.valid_len)
        return tuple(idx)

    def numel_valid(self) -> int:
        n = 1
        for i, s in enumerate(self.full_shape):
            n *= self.valid_len if i == self.dim else s
        return n

    def slice_full(self, full: torch.Tensor) -> torch.Tensor:
        """The local tensor cut from a full one, padding rows zero-filled."""
        part = full[self.full_index()]
        if self.dim is None or self.valid_len == self.stop - self.start:
            return part.contiguous()
        out = full.new_zeros(self.local_shape)
        out[self.local_valid_index()] = part
        return out


def split_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """Even split of ``size`` into ``parts``; raises if it does not divide."""
    if size % parts:
        raise ValueError(f"{size} does not divide into {parts} parts")
    step = size // parts
    return index * step, (index + 1) * step


def padded_size(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def replicated_head_range(n_heads: int, head_dim: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """Rows of a K/V projection this rank holds: its share of heads, or, when tp exceeds the head
    count, the one head its group of tp/n_heads ranks replicates."""
    if tp <= n_heads:
        h0, h1 = split_range(n_heads, tp, tp_rank)
    else:
        if tp % n_heads:
            raise ValueError(f"tp={tp} is not a multiple of the {n_heads} KV heads")
        h0 = tp_rank // (tp // n_heads)
        h1 = h0 + 1
    return h0 * head_dim, h1 * head_dim
