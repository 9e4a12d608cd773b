"""Planning a reallocation: which rank sends which slice of which parameter to whom.

``plan`` is a pure function of two layouts and every rank's ShardSpecs, so every rank computes the
same plan with no communication, and the planner CLI can price a 70B move on a laptop. A tensor's
region is a box (per-dimension ``[start, stop)`` in the full, unpadded tensor); a destination shard
is cut into cells along every source boundary that crosses it, so TP sizes need not divide each
other and padding (indices past ``full_shape[dim]``) never enters a box.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import torch

from .layout import ParallelLayout
from .sharding import ShardSpec

Box = tuple[tuple[int, int], ...]


class PlanError(ValueError):
    """Specs that no reallocation can satisfy; the message names the parameter and the rank."""


@dataclass(frozen=True)
class Transfer:
    """One region of one parameter from ``src`` to ``dst`` (``src == dst``: a local copy)."""

    src: int
    dst: int
    name: str
    box: Box        # region of the full tensor
    src_index: Box  # the same region in the source's local tensor
    dst_index: Box  # and in the destination's local tensor
    nbytes: int

    @property
    def local(self) -> bool:
        return self.src == self.dst

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.box)

    def rows(self, lo: int, hi: int) -> "Transfer":
        """Rows [lo, hi) of this transfer's box along dim 0 (offsets relative to the box)."""
        n = self.box[0][1] - self.box[0][0]
        row_bytes = self.nbytes // n if n else 0

        def cut(b: Box) -> Box:
            return ((b[0][0] + lo, b[0][0] + hi),) + b[1:]
        return replace(self, box=cut(self.box), src_index=cut(self.src_index),
                       dst_index=cut(self.dst_index), nbytes=row_bytes * (hi - lo))


def slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def box_numel(box: Box) -> int:
    return math.prod(b - a for a, b in box)


def valid_box(spec: ShardSpec) -> Box:
    """The real (non-padding) region of the full tensor a spec holds."""
    return tuple((spec.start, spec.valid_stop) if d == spec.dim else (0, n)
                 for d, n in enumerate(spec.full_shape))


@functools.lru_cache(maxsize=1 << 16)
def to_local(box: Box, spec: ShardSpec) -> Box:
    if spec.dim is None:
        return box
    return tuple((a - spec.start, b - spec.start) if d == spec.dim else (a, b)
                 for d, (a, b) in enumerate(box))


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


def _contains(outer: Box, inner: Box) -> bool:
    return all(o0 <= i0 and i1 <= o1 for (o0, o1), (i0, i1) in zip(outer, inner))


def _cells(need: Box, boxes: list[Box]) -> list[Box]:
    """Cut ``need`` along every boundary of ``boxes`` that falls inside it."""
    cuts = []
    for d, (lo, hi) in enumerate(need):
        pts = {lo, hi}
        for b in boxes:
            pts.update(p for p in b[d] if lo < p < hi)
        p = sorted(pts)
        cuts.append(list(zip(p[:-1], p[1:])))
    return [tuple(c) for c in _product(cuts)]


def _product(lists):
    out = [()]
    for options in lists:
        out = [prefix + (o,) for prefix in out for o in options]
    return out


@functools.lru_cache(maxsize=1 << 16)
def _row_chunks(box: Box, parts: int) -> tuple[Box, ...]:
    lo, hi = box[0]
    edges = [lo + (hi - lo) * i // parts for i in range(parts + 1)]
    return tuple(((a, b),) + box[1:] for a, b in zip(edges[:-1], edges[1:]) if a < b)


@dataclass
class ReallocPlan:
    """Transfers that give every destination rank each byte of its shards exactly once."""

    src_ranks: list[int]
    dst_ranks: list[int]
    transfers: list[Transfer]
    padding: list[tuple[int, str, Box]]   # (dst rank, name, local region) to zero after a copy
    dtypes: dict[str, torch.dtype]        # wire dtype per parameter
    min_recv_bytes: dict[int, int]        # per destination: valid bytes it does not hold already
    node: dict[int, object] | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def ranks(self) -> list[int]:
        return sorted(set(self.src_ranks) | set(self.dst_ranks))

    def stats(self) -> dict:
        """Bytes per sender (max/min over ranks that send), received vs minimum, local, cross-node."""
        sent = {r: 0 for r in self.src_ranks}
        recv = {r: 0 for r in self.dst_ranks}
        local = cross = 0
        for t in self.transfers:
            if t.local:
                local += t.nbytes
                continue
            sent[t.src] += t.nbytes
            recv[t.dst] += t.nbytes
            if self.node is not None and self.node[t.src] != self.node[t.dst]:
                cross += t.nbytes
        senders = [b for b in sent.values() if b]
        excess = [recv[d] / self.min_recv_bytes[d] for d in self.dst_ranks if self.min_recv_bytes[d]]
        return {
            "remote_bytes": sum(recv.values()), "local_bytes": local, "cross_node_bytes": cross,
            "senders": len(senders), "sender_max_bytes": max(senders, default=0),
            "sender_min_bytes": min(senders, default=0),
            "sender_max_over_min": max(senders) / min(senders) if senders else 1.0,
            "recv_bytes": recv, "min_recv_bytes": dict(self.min_recv_bytes),
            "recv_over_min_max": max(excess, default=1.0), "sent_bytes": sent,
            "transfers": len(self.transfers),
        }

    def schedule(self, bucket_bytes: int) -> list[list[tuple[int, int, list[Transfer]]]]:
        """Rounds of (src, dst, transfers packed into one buffer). Per round a rank sends at most
        ``bucket_bytes`` and receives at most that (a single row larger than a bucket goes alone), so
        staging memory stays bounded; every rank derives the same rounds from the same plan."""
        key = ("schedule", bucket_bytes)
        if key not in self._cache:
            self._cache[key] = _schedule(self.transfers, bucket_bytes)
        return self._cache[key]

    def local_copies(self, rank: int) -> list[Transfer]:
        key = ("local", rank)
        if key not in self._cache:
            self._cache[key] = [t for t in self.transfers if t.local and t.dst == rank]
        return self._cache[key]


def _schedule(transfers, cap):
    pairs: dict[tuple[int, int], list[list[Transfer]]] = {}
    for t in sorted((t for t in transfers if not t.local), key=_order):
        chunks = pairs.setdefault((t.src, t.dst), [[]])
        for piece in _split_rows(t, cap):
            if chunks[-1] and sum(p.nbytes for p in chunks[-1]) + piece.nbytes > cap:
                chunks.append([])
            chunks[-1].append(piece)
    # Every pair's first chunk before anyone's second, so early rounds keep all links busy.
    order = sorted(((i, s, d, c) for (s, d), cs in pairs.items() for i, c in enumerate(cs)),
                   key=lambda x: x[:3])
    rounds: list[list] = []
    sent: list[dict] = []
    got: list[dict] = []
    for _, s, d, chunk in order:
        n = sum(p.nbytes for p in chunk)
        for k in range(len(rounds) + 1):
            if k == len(rounds):
                rounds.append([])
                sent.append({})
                got.append({})
            a, b = sent[k].get(s, 0), got[k].get(d, 0)
            if (a == 0 or a + n <= cap) and (b == 0 or b + n <= cap):
                rounds[k].append((s, d, chunk))
                sent[k][s], got[k][d] = a + n, b + n
                break
    return rounds


def _split_rows(t: Transfer, cap: int) -> list[Transfer]:
    rows = t.box[0][1] - t.box[0][0]
    if t.nbytes <= cap or rows <= 1:
        return [t]
    per = max(1, cap // (t.nbytes // rows))
    return [t.rows(lo, min(lo + per, rows)) for lo in range(0, rows, per)]


def _order(t: Transfer):
    return (t.src, t.dst, t.name, t.box)


def _itemsize(dtype, name) -> int:
    d = dtype.get(name, torch.float32) if isinstance(dtype, dict) else dtype
    return torch.empty((), dtype=d).element_size()


def _check_specs(layout: ParallelLayout, specs: dict, which: str):
    missing = sorted(set(layout.ranks) - set(specs))
    if missing:
        raise PlanError(f"{which}_specs has no entry for ranks {missing} of {layout.name} "
                        f"(ranks {layout.ranks}): give specs for every rank of the layout")


def _holders(src_specs: dict) -> dict[str, list[tuple[int, Box]]]:
    out: dict[str, list[tuple[int, Box]]] = {}
    for r in sorted(src_specs):
        for name, spec in src_specs[r].items():
            if spec.dim is None or spec.valid_len > 0:
                out.setdefault(name, []).append((r, valid_box(spec)))
    return out


def plan(src_layout: ParallelLayout, dst_layout: ParallelLayout, src_specs: dict, dst_specs: dict, *,
         node_of=None, dtype=torch.float32, min_chunk_bytes: int = 1 << 16) -> ReallocPlan:
    """Transfers that move a model from ``src_layout`` to ``dst_layout``.

    ``src_specs``/``dst_specs``: {global rank: {name: ShardSpec}} for every rank of each layout.
    ``node_of(rank) -> node id`` makes senders on the destination's node preferred. ``dtype`` (one
    dtype or {name: dtype}) is the wire dtype that sizes the bytes. A remote cell that several
    replicas hold is split into row chunks of at least ``min_chunk_bytes`` so replicas share it; chunks
    go, largest and most constrained first, to the least-loaded candidate (ties: lowest rank).
    """
    _check_specs(src_layout, src_specs, "src")
    _check_specs(dst_layout, dst_specs, "dst")
    holders = _holders(src_specs)
    distinct = {name: {b for _, b in hs} for name, hs in holders.items()}
    cut: dict = {}
    src_shape = {n: s.full_shape for r in src_specs for n, s in src_specs[r].items()}
    ranks = sorted(set(src_layout.ranks) | set(dst_layout.ranks))
    node = {r: node_of(r) for r in ranks} if node_of is not None else None
    dtypes = {}
    transfers, pending, padding = [], [], []
    min_recv = {r: 0 for r in dst_layout.ranks}
    for d in sorted(dst_layout.ranks):
        for name in sorted(dst_specs[d]):
            spec = dst_specs[d][name]
            if name not in holders:
                raise PlanError(f"'{name}' (on destination rank {d}) is held by no source rank")
            if src_shape[name] != spec.full_shape:
                raise PlanError(f"'{name}': source full shape {src_shape[name]} != destination "
                                f"{spec.full_shape}: the layouts hold different models")
            dtypes[name] = dtype.get(name, torch.float32) if isinstance(dtype, dict) else dtype
            item = _itemsize(dtype, name)
            if spec.dim is not None and spec.valid_stop < spec.stop:
                pad = tuple((spec.valid_len, spec.stop - spec.start) if i == spec.dim else (0, n)
                            for i, n in enumerate(spec.full_shape))
                padding.append((d, name, pad))
            need = valid_box(spec)
            if box_numel(need) == 0:
                continue
            # data-parallel replicas hold (and need) equal boxes: cut each distinct need once
            if (name, need) not in cut:
                hit = {b for b in distinct[name] if _intersect(b, need)}
                cut[(name, need)] = (hit, [(cell, {b for b in hit if _contains(b, cell)})
                                           for cell in _cells(need, list(hit))])
            hit, cells = cut[(name, need)]
            boxes = [(r, b) for r, b in holders[name] if b in hit]
            src_of = {r: src_specs[r][name] for r, _ in boxes}
            for cell, inside in cells:
                cands = [r for r, b in boxes if b in inside]
                if not cands:
                    raise PlanError(f"'{name}': no source rank holds region {cell} that destination "
                                    f"rank {d} needs")
                nbytes = box_numel(cell) * item
                if d in cands:
                    transfers.append(Transfer(d, d, name, cell, to_local(cell, src_of[d]),
                                              to_local(cell, spec), nbytes))
                    continue
                min_recv[d] += nbytes
                if node is not None:
                    near = [r for r in cands if node[r] == node[d]]
                    cands = near or cands
                parts = min(len(cands), cell[0][1] - cell[0][0],
                            max(1, nbytes // max(1, min_chunk_bytes)))
                for chunk in _row_chunks(cell, parts):
                    pending.append((len(cands), -box_numel(chunk) * item, d, name, chunk, cands))
    transfers += _assign(pending, src_specs, dst_specs, src_layout.ranks)
    transfers.sort(key=_order)
    return ReallocPlan(sorted(src_layout.ranks), sorted(dst_layout.ranks), transfers, padding,
                       dtypes, min_recv, node)


def _assign(pending, src_specs, dst_specs, src_ranks) -> list[Transfer]:
    """Greedy least-loaded: each chunk to the candidate with the fewest bytes so far."""
    load = {r: 0 for r in src_ranks}
    out = []
    for _, neg_bytes, d, name, box, cands in sorted(pending):
        s = min(cands, key=lambda r: (load[r], r))
        load[s] -= neg_bytes
        out.append(Transfer(s, d, name, box, to_local(box, src_specs[s][name]),
                            to_local(box, dst_specs[d][name]), -neg_bytes))
    return out


def specs_for_layout(build_fn, layout: ParallelLayout) -> dict[int, dict[str, ShardSpec]]:
    """{rank: {name: spec}} for every rank of ``layout``, from ``build_fn(virtual_layout)`` returning a
    module with ``.specs`` (build it on the meta device: no memory, no process groups) or the dict."""
    out = {}
    for r in layout.ranks:
        built = build_fn(layout.as_seen_by(r))
        out[r] = dict(built.specs if hasattr(built, "specs") else built)
    return out
