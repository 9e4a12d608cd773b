"""Where each model function call runs, how its model's weights get there, and how data moves
between the calls' layouts.

A model lives in its *home* layout (that of its training call, else of its first call). A call in
another layout runs on a *view*: a stage of the same model built for that layout, filled by
reallocation (`meshrl.parallel.realloc`) from the home stage whenever the home weights have changed
since the last fill. Every rank runs the same sequence of calls (SPMD): a rank outside a call's
layout skips the computation but joins the collectives that move weights and data, so models on
disjoint meshes compute at the same time.

Data moves explicitly: a call computes on its data-parallel replica's contiguous share of a global
list, and the replicas' results are gathered to every rank (one reporting rank per replica), in
the list's order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from meshrl.engine.model import LlamaStage, meta_specs
from meshrl.parallel.layout import ParallelLayout
from meshrl.parallel.realloc import execute, plan, tensors_by_spec


def share(items: list, layout: ParallelLayout) -> tuple[list, int]:
    """This replica's contiguous share of ``items`` and the global index of its first item."""
    n, d, r = len(items), layout.dp_size, layout.dp_rank
    lo, hi = r * n // d, (r + 1) * n // d
    return items[lo:hi], lo


def is_reporter(layout: ParallelLayout) -> bool:
    """The one rank per replica whose results count: last stage, tensor-parallel rank 0."""
    return layout.is_member and layout.is_last_stage and layout.tp_rank == 0


def all_gather_objects(obj, group=None) -> list:
    """Every rank's ``obj``, in rank order (over ``group``, default the world's)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_from(obj, src_rank: int):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src_rank)
    return box[0]


class View:
    """A model's stage in a non-home layout, and the plan that fills it from home."""

    def __init__(self, model, layout: ParallelLayout, *, node_of):
        self.model, self.layout = model, layout
        cfg, head = model.stage_config, model.head
        home = model.layout
        self.plan = plan(home, layout, meta_specs(cfg, head, home), meta_specs(cfg, head, layout),
                         node_of=node_of, dtype=model.dtype)
        self.stage = None
        if layout.is_member:
            self.stage = LlamaStage(cfg, layout, head=head, dtype=model.dtype, device=model.device)
            self.stage.requires_grad_(False)
        self.version = -1

    def refresh(self) -> dict | None:
        """Collective over the world: reallocate if the home weights changed since the last fill."""
        if self.version == self.model.version:
            return None
        src = tensors_by_spec(self.model.stage) if self.model.stage is not None else None
        dst = tensors_by_spec(self.stage) if self.stage is not None else None
        counts = execute(self.plan, src, dst)
        self.version = self.model.version
        return counts


def blend_into(dst_model, src_model, plan_cache: dict, *, alpha: float | None, node_of):
    """dst ← α·dst + (1−α)·src (or a copy when alpha is None) between two models' home stages, by
    reallocation when their layouts differ. Collective over the world."""
    if dst_model.layout is src_model.layout:
        if dst_model.stage is not None:
            with torch.no_grad():
                for d, s in zip(dst_model.stage.parameters(), src_model.stage.parameters()):
                    if alpha is None:
                        d.copy_(s)
                    else:
                        d.copy_(d.float().lerp_(s.float(), 1.0 - alpha))
        return
    key = (src_model.name, dst_model.name)
    if key not in plan_cache:
        cfg, head = src_model.stage_config, src_model.head
        plan_cache[key] = plan(src_model.layout, dst_model.layout, meta_specs(cfg, head, src_model.layout),
                               meta_specs(cfg, head, dst_model.layout), node_of=node_of,
                               dtype=src_model.dtype)
    src = tensors_by_spec(src_model.stage) if src_model.stage is not None else None
    dst = tensors_by_spec(dst_model.stage) if dst_model.stage is not None else None
    execute(plan_cache[key], src, dst, blend=alpha)
