"""A model's shard specs in any layout, from stages built on the meta device: no memory, no process
groups, so any process can compute them for any layout (what the reallocation planner takes)."""
from __future__ import annotations

from meshrl.parallel.layout import ParallelLayout
from meshrl.parallel.sharding import ShardSpec

from .config import ModelConfig
from .llama import LlamaStage


def meta_specs(cfg: ModelConfig, head: str, layout: ParallelLayout) -> dict[int, dict[str, ShardSpec]]:
    """{rank: {name: spec}} of every rank of ``layout``. One stage per (tp, pp, ep) coordinate: dp
    replicas holding the same experts hold the same shards."""
    by_coord, out = {}, {}
    for r in layout.ranks:
        c = layout.coord_of(r)
        key = (c.tp, c.pp, c.ep)
        if key not in by_coord:
            by_coord[key] = LlamaStage(cfg, layout.as_seen_by(r), head=head, device="meta").specs
        out[r] = dict(by_coord[key])
    return out
