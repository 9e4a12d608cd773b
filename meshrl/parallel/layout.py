"""A 3D parallel layout (tp, pp, dp) over an explicit, ordered list of global ranks, with expert
parallelism (ep) carved from dp.

Position i in ``ranks`` has coordinates with tp fastest, then dp, then pp:
``i = (pp_rank * dp + dp_rank) * tp + tp_rank``. Every group is built in coordinate order, so a
rank's position in its tp (dp, pp) group is its tp_rank (dp_rank, pp_rank). Several layouts live
in one process; each owns its process groups, and nothing is global.

Expert parallelism splits the dp ranks into groups of ``ep`` consecutive dp indices:
``ep_rank = dp_rank % ep`` says which experts a rank holds, ``edp_rank = dp_rank // ep`` which copy
of them. Attention and every other dense parameter stay replicated over all of dp; an expert's
weights are replicated over the dp/ep ranks of its ``edp`` group, whose gradients are summed there.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch.distributed as dist

# torch sorts a new group's ranks unless told not to (``new_group(sort_ranks=False)``, added in
# 2026). Sorted, a group's rank order would not be the layout's coordinate order, and collectives
# that order by group rank (all_gather, a chunk's index) would disagree with the shard each rank
# holds. Where torch cannot keep the order, a layout that needs it is refused.
_NEW_GROUP_KEEPS_ORDER = "sort_ranks" in inspect.signature(dist.new_group).parameters


class LayoutError(ValueError):
    """A layout that cannot be built; the message names the field and the fix."""


@dataclass(frozen=True)
class Coord:
    tp: int
    dp: int
    pp: int
    ep: int = 0   # dp % ep: which experts this rank holds
    edp: int = 0  # dp // ep: which copy of them


def parse_ranks(spec) -> list[int]:
    """"0-3,6,8-9" or a list of ints -> list of ints (order kept)."""
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        return [int(r) for r in spec]
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def format_ranks(ranks) -> str:
    """Ranks as a config writes them, ``parse_ranks``'s inverse: runs of consecutive ranks as lo-hi
    ("0-3,6")."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def world_size_or_one() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_rank_or_zero() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def group_size(group) -> int:
    """Size of a process group, where None means "this process alone"."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


class ParallelLayout:
    """Ranks, coordinates and (unless ``virtual``) the process groups of one layout.

    Building a non-virtual layout is collective: every rank of the world builds every layout in the
    same order. A virtual layout has no groups; it answers coordinate questions for any rank
    (``as_rank``) and serves planning and meta-device model construction.
    """

    def __init__(self, *, ranks, tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1,
                 virtual: bool = False, as_rank: int | None = None, world_size: int | None = None,
                 name: str = "layout"):
        self.name = name
        self.ranks = parse_ranks(ranks)
        self.tp_size, self.pp_size, self.dp_size = int(tp), int(pp), int(dp)
        self.ep_size = int(ep)
        for field, v in (("tp", self.tp_size), ("pp", self.pp_size), ("dp", self.dp_size),
                         ("ep", self.ep_size)):
            if v < 1:
                raise LayoutError(f"{name}.{field}={v}: must be a positive integer")
        if self.dp_size % self.ep_size:
            raise LayoutError(f"{name}.ep={self.ep_size} does not divide dp={self.dp_size}: expert "
                              "ranks are carved from the data-parallel ones; choose an ep that "
                              "divides dp (or raise dp)")
        n = self.tp_size * self.pp_size * self.dp_size
        if len(self.ranks) != n:
            raise LayoutError(f"{name}.ranks has {len(self.ranks)} ranks but tp*pp*dp = "
                              f"{self.tp_size}*{self.pp_size}*{self.dp_size} = {n}: make them equal")
        if len(set(self.ranks)) != len(self.ranks):
            raise LayoutError(f"{name}.ranks lists a rank twice ({self.ranks}): list each once")
        world = world_size if world_size is not None else (None if virtual else world_size_or_one())
        if world is not None and any(r < 0 or r >= world for r in self.ranks):
            bad = [r for r in self.ranks if r < 0 or r >= world]
            raise LayoutError(f"{name}.ranks names ranks {bad} outside the world of {world} "
                              f"(0..{world - 1}): use ranks that exist")
        self.virtual = virtual
        self._index = {r: i for i, r in enumerate(self.ranks)}
        self.rank = as_rank if as_rank is not None else (None if virtual else global_rank_or_zero())
        self.coord = self.coord_of(self.rank) if self.rank is not None else None
        self.tp_group = self.pp_group = self.dp_group = self.group = self.mp_group = None
        self.ends_group = self.ep_group = self.edp_group = self.expert_mp_group = None
        if not virtual:
            self._build_groups()

    # ---- pure coordinate arithmetic -----------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.ranks)

    def coord_of(self, global_rank: int) -> Coord | None:
        i = self._index.get(global_rank)
        if i is None:
            return None
        tp = i % self.tp_size
        dp = (i // self.tp_size) % self.dp_size
        pp = i // (self.tp_size * self.dp_size)
        return Coord(tp=tp, dp=dp, pp=pp, ep=dp % self.ep_size, edp=dp // self.ep_size)

    def rank_at(self, *, tp: int, dp: int, pp: int) -> int:
        return self.ranks[(pp * self.dp_size + dp) * self.tp_size + tp]

    def tp_ranks_of(self, dp: int, pp: int) -> list[int]:
        return [self.rank_at(tp=t, dp=dp, pp=pp) for t in range(self.tp_size)]

    def dp_ranks_of(self, tp: int, pp: int) -> list[int]:
        return [self.rank_at(tp=tp, dp=d, pp=pp) for d in range(self.dp_size)]

    def pp_ranks_of(self, tp: int, dp: int) -> list[int]:
        return [self.rank_at(tp=tp, dp=dp, pp=p) for p in range(self.pp_size)]

    def mp_ranks_of(self, dp: int) -> list[int]:
        """One model replica: every (tp, pp) at this dp index, pp-major."""
        return [self.rank_at(tp=t, dp=dp, pp=p) for p in range(self.pp_size) for t in range(self.tp_size)]

    def ep_ranks_of(self, tp: int, edp: int, pp: int) -> list[int]:
        """The ranks that share out one copy of the experts (consecutive dp indices)."""
        return [self.rank_at(tp=tp, dp=edp * self.ep_size + e, pp=pp) for e in range(self.ep_size)]

    def edp_ranks_of(self, tp: int, ep: int, pp: int) -> list[int]:
        """The ranks holding the same experts: their gradients are summed over these."""
        return [self.rank_at(tp=tp, dp=j * self.ep_size + ep, pp=pp)
                for j in range(self.dp_size // self.ep_size)]

    def expert_mp_ranks_of(self, edp: int) -> list[int]:
        """One copy of every expert: each (tp, ep, pp) at this edp index, pp-major."""
        return [self.rank_at(tp=t, dp=edp * self.ep_size + e, pp=p) for p in range(self.pp_size)
                for e in range(self.ep_size) for t in range(self.tp_size)]

    def as_seen_by(self, global_rank: int) -> "ParallelLayout":
        """A virtual copy answering for another rank (for meta-device builds and planning)."""
        return ParallelLayout(ranks=self.ranks, tp=self.tp_size, pp=self.pp_size, dp=self.dp_size,
                              ep=self.ep_size, virtual=True, as_rank=global_rank, name=self.name)

    # ---- this process's view -----------------------------------------------------------------
    @property
    def is_member(self) -> bool:
        return self.coord is not None

    def _require_member(self):
        if self.coord is None:
            raise RuntimeError(f"rank {self.rank} is not in {self.name} (ranks {self.ranks})")
        return self.coord

    @property
    def tp_rank(self) -> int:
        return self._require_member().tp

    @property
    def dp_rank(self) -> int:
        return self._require_member().dp

    @property
    def pp_rank(self) -> int:
        return self._require_member().pp

    @property
    def ep_rank(self) -> int:
        return self._require_member().ep

    @property
    def edp_rank(self) -> int:
        return self._require_member().edp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp: int) -> int:
        """Global rank of stage ``pp`` in this rank's pipeline."""
        c = self._require_member()
        return self.rank_at(tp=c.tp, dp=c.dp, pp=pp)

    # ---- groups ------------------------------------------------------------------------------
    def _build_groups(self):
        if not (dist.is_available() and dist.is_initialized()):
            if self.ranks != [0]:
                raise LayoutError(f"{self.name}.ranks={self.ranks} needs torch.distributed: launch "
                                  "with torchrun or use ranks=[0]")
            return
        me = self.rank
        t, d, p, e = self.tp_size, self.dp_size, self.pp_size, self.ep_size
        lists = {
            "tp": [self.tp_ranks_of(dp, pp) for pp in range(p) for dp in range(d)],
            "dp": [self.dp_ranks_of(tp, pp) for pp in range(p) for tp in range(t)],
            "pp": [self.pp_ranks_of(tp, dp) for dp in range(d) for tp in range(t)],
            "mp": [self.mp_ranks_of(dp) for dp in range(d)],
            "": [list(self.ranks)],
            # First and last stage of each pipeline: parameters both ends hold (tied embeddings).
            "ends": ([[self.rank_at(tp=tp, dp=dp, pp=0), self.rank_at(tp=tp, dp=dp, pp=p - 1)]
                      for dp in range(d) for tp in range(t)] if p > 1 else []),
            "ep": ([self.ep_ranks_of(tp, j, pp) for pp in range(p) for j in range(d // e)
                    for tp in range(t)] if e > 1 else []),
            "edp": ([self.edp_ranks_of(tp, k, pp) for pp in range(p) for k in range(e)
                     for tp in range(t)] if e > 1 else []),
            "expert_mp": [self.expert_mp_ranks_of(j) for j in range(d // e)] if e > 1 else [],
        }
        if not _NEW_GROUP_KEEPS_ORDER:  # refuse before building anything: every rank stops here
            for axis, rank_lists in lists.items():
                for ranks in rank_lists:
                    if ranks != sorted(ranks):
                        raise LayoutError(
                            f"{self.name}.ranks orders the {axis or 'layout'} group {ranks} "
                            "against ascending global rank, which this torch's new_group cannot "
                            "keep: list each group ascending or use a torch whose new_group "
                            "takes sort_ranks")

        def build(rank_lists):
            mine = None
            for ranks in rank_lists:
                if len(ranks) == 1:
                    continue
                g = (dist.new_group(ranks, sort_ranks=False) if _NEW_GROUP_KEEPS_ORDER
                     else dist.new_group(ranks))
                if me in ranks:
                    mine = g
            return mine

        self.tp_group = build(lists["tp"])
        self.dp_group = build(lists["dp"])
        self.pp_group = build(lists["pp"])
        self.mp_group = build(lists["mp"])
        self.group = build(lists[""])
        if p > 1:
            self.ends_group = build(lists["ends"])
        if e > 1:
            self.ep_group = build(lists["ep"])
            self.edp_group = build(lists["edp"])
            self.expert_mp_group = build(lists["expert_mp"])
        else:  # one copy of the experts per model replica: the dense groups serve
            self.edp_group, self.expert_mp_group = self.dp_group, self.mp_group

    def __repr__(self):
        ep = f", ep={self.ep_size}" if self.ep_size > 1 else ""
        return (f"ParallelLayout({self.name}: tp={self.tp_size}, pp={self.pp_size}, dp={self.dp_size}"
                f"{ep}, ranks={self.ranks})")


def single_process_layout(name: str = "layout") -> ParallelLayout:
    return ParallelLayout(ranks=[global_rank_or_zero()], tp=1, pp=1, dp=1, name=name)
