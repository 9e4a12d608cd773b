"""The pipelined decode schedule of one chunk of decode steps: which microbatch and step each stage
runs at each tick, and which p2p transfers connect consecutive ticks.

With pp stages the slots are split into M = min(pp, slots) microbatches and item (m, j) — microbatch
m, the chunk's decode step j ≥ 1 — enters stage 0 at tick (j-1)·pp + m and reaches stage s at tick
(j-1)·pp + m + s.
When M = pp every stage has an item at every tick of the steady state, and the last stage samples
(m, j) exactly one tick before stage 0 needs that token for (m, j+1): the tokens travel around the
ring with no bubble. After each tick one batched exchange moves each stage's output to its
successor (hidden states) and the last stage's tokens to the first. A chunk starts with the tokens
stage 0 needs already there (the engine broadcasts them from the last stage between chunks) and ends
with the pipeline drained, so slots can be refilled between chunks.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    m: int  # microbatch
    j: int  # the decode step within the chunk, from 1


@dataclass(frozen=True)
class Schedule:
    pp: int
    microbatches: int
    steps: int  # decode steps in the chunk

    @property
    def ticks(self) -> int:
        if self.steps < 1:
            return 0
        return (self.steps - 1) * self.pp + self.microbatches + self.pp - 1

    def item(self, tick: int, stage: int) -> Item | None:
        r = tick - stage
        if r < 0:
            return None
        m, j = r % self.pp, r // self.pp + 1
        return Item(m, j) if m < self.microbatches and j <= self.steps else None

    def transfers(self, tick: int, stage: int) -> list[tuple[str, str, int]]:
        """(kind, 'send'|'recv', microbatch) this stage posts in the exchange after ``tick``:
        kind 'hidden' goes stage s -> s+1, kind 'tokens' goes last -> first."""
        last = self.pp - 1
        cur, nxt = self.item(tick, stage), self.item(tick + 1, stage)
        out = []
        if stage < last and cur:
            out.append(("hidden", "send", cur.m))
        if stage > 0 and nxt:
            out.append(("hidden", "recv", nxt.m))
        if stage == last and cur and cur.j < self.steps:
            out.append(("tokens", "send", cur.m))
        if stage == 0 and nxt and nxt.j > 1:
            out.append(("tokens", "recv", nxt.m))
        return out


def split_rows(batch: int, parts: int) -> list[slice]:
    """Contiguous row ranges, sizes differing by at most one."""
    bounds = [batch * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]
