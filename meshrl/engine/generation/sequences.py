"""The sequences one generation call produces, and their order.

A call takes N prompts and ``samples`` = K: sequence i (0 <= i < N·K) continues prompt i // K, its
output is the i-th of the result (prompt-major, K adjacent per prompt), and its sampling noise is
keyed ``seq_offset + i``, so its tokens depend on neither the engine, the slot it ran in, the order
sequences finished in nor the batch or slot count. ``limits`` caps each sequence's new tokens below
the sampling parameters' ``max_new_tokens`` (a sequence that reaches its cap finishes "length").
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sequences:
    prompts: list  # the N distinct prompts (lists of token ids)
    samples: int
    limits: tuple  # per sequence, new tokens at most
    seq_offset: int = 0

    @staticmethod
    def build(prompts, max_new_tokens: int, *, samples: int = 1, limits=None,
              seq_offset: int = 0) -> "Sequences":
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        if samples < 1:
            raise ValueError(f"generate: samples={samples}: each prompt needs at least 1 sample")
        n = len(prompts) * samples
        if limits is None:
            limits = (max_new_tokens,) * n
        limits = tuple(int(x) for x in limits)
        if len(limits) != n:
            raise ValueError(f"generate: limits has {len(limits)} entries for {n} sequences "
                             "(one per prompt and sample)")
        if limits and not 1 <= min(limits) <= max(limits) <= max_new_tokens:
            raise ValueError(f"generate: limits must lie in [1, max_new_tokens={max_new_tokens}], "
                             f"got {min(limits)}..{max(limits)}")
        return Sequences([list(p) for p in prompts], samples, limits, seq_offset)

    def __len__(self) -> int:
        return len(self.prompts) * self.samples

    def slot_count(self, slots: int | None) -> int:
        """Sequences decoded at once for a call's ``slots`` (None: all of them), at most all."""
        if slots is not None and slots < 1:
            raise ValueError(f"generate: slots={slots}: must be at least 1")
        return min(slots or len(self), len(self))

    def prompt_index(self, i: int) -> int:
        return i // self.samples

    def prompt(self, i: int) -> list:
        return self.prompts[i // self.samples]

    def flat_prompts(self, lo: int = 0, hi: int | None = None) -> list:
        """Sequences lo..hi's prompts, one per sequence (repeated for each sample)."""
        hi = len(self) if hi is None else hi
        return [self.prompt(i) for i in range(lo, hi)]
