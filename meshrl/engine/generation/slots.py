"""Which sequence runs in which decode slot: the host-side bookkeeping of continuous batching.

The fast engine decodes a fixed number of slots (so its step keeps static shapes and stays one
captured graph). Between decode chunks it reads which slots finished, frees them, and admits waiting
sequences, in order, into the free slots (``refill=False``: only once every slot is free, i.e.
static batches). A slot's cache keeps the prompt it last held until it is given another prompt, so a
sample whose prompt some slot still holds copies that prefix instead of prefilling it again; only
prompts no slot holds are prefilled, once per admission, and their other samples copy from the
prefilled slot. Every rank of a replica keeps the same table (it sees the same finished slots), so
all take the same decisions without talking.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .sequences import Sequences


@dataclass
class Admission:
    slots: list = field(default_factory=list)  # (slot, sequence) pairs admitted
    prefill: list = field(default_factory=list)  # (slot, prompt index) prefilled into the slot
    copies: list = field(default_factory=list)  # (source slot, target slot, prompt index)
    completed: list = field(default_factory=list)  # prompts whose last sample was admitted

    def __bool__(self) -> bool:
        return bool(self.slots)


class SlotTable:
    def __init__(self, n_slots: int, seqs: Sequences, *, refill: bool = True,
                 share_prefixes: bool = True):
        self.seqs, self.refill, self.share = seqs, refill, share_prefixes
        self.running = [-1] * n_slots  # the sequence in each slot, -1 when free
        self.holds = [-1] * n_slots  # the prompt whose prefix each slot's cache holds, -1: none
        self.next = 0  # the first sequence not yet admitted

    @property
    def waiting(self) -> int:
        return len(self.seqs) - self.next

    @property
    def all_finished(self) -> bool:
        return not self.waiting and all(q < 0 for q in self.running)

    def finish(self, done) -> list[tuple[int, int]]:
        """Free the busy slots whose flag in ``done`` (per slot) is set; returns (slot, sequence)."""
        out = [(s, q) for s, q in enumerate(self.running) if q >= 0 and done[s]]
        for s, _ in out:
            self.running[s] = -1
        return out

    def admit(self) -> Admission:
        free = [s for s, q in enumerate(self.running) if q < 0]
        adm = Admission()
        if not free or not self.waiting or (not self.refill and len(free) < len(self.running)):
            return adm
        take = min(len(free), self.waiting)
        adm.slots = [(free[j], self.next + j) for j in range(take)]
        self.next += take
        targets: dict[int, list[int]] = {}
        for slot, q in adm.slots:
            targets.setdefault(self.seqs.prompt_index(q), []).append(slot)
            self.running[slot] = q
        for p, slots in targets.items():
            if not self.share:
                adm.prefill += [(s, p) for s in slots]
            elif holders := [s for s in range(len(self.holds)) if self._keeps(s, p)]:
                adm.copies += [(holders[0], s, p) for s in slots if self.holds[s] != p]
            else:
                adm.prefill.append((slots[0], p))
                adm.copies += [(slots[0], s, p) for s in slots[1:]]
            for s in slots:
                self.holds[s] = p
            if (p + 1) * self.seqs.samples <= self.next:
                adm.completed.append(p)
        return adm

    def _keeps(self, slot: int, p: int) -> bool:
        """Whether ``slot`` holds prompt p's prefix and keeps it through the admission being made
        (it is free and not given a sequence, or runs a sample of p)."""
        q = self.running[slot]
        return self.holds[slot] == p and (q < 0 or self.seqs.prompt_index(q) == p)
