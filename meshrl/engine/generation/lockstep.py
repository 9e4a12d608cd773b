"""Expert parallelism couples data-parallel replicas in generation.

Each replica of an ep group generates its own prompts, but a sparse layer's all-to-all (in a
captured decode step, its all-gather) must meet the same layer's collective on every other replica
of the group. So the replicas' generation loops agree, at each point where they could diverge, on
what they run: the number of static batches and steps (the reference engine), the slot count and
whether a round admits or decodes (the fast engine), and when all of them are done. A replica with
nothing of its own to run still makes the collectives its peers expect: an ``idle_pass``, steps on
parked slots, or a placeholder sequence whose output is dropped. Without ep (``ep=1``) every
function here is the identity and costs nothing.
"""
from __future__ import annotations

import torch

from meshrl.parallel.mappings import group_max

from ..model.moe import SparseMoE
from .outputs import GenerationResult


def coupled(layout) -> bool:
    return layout.ep_size > 1


def agree_max(values: list[int], layout, device) -> list[int]:
    """The elementwise maximum over the replicas of this rank's ep group."""
    return group_max(values, layout.ep_group, device)


def agree_all(flag: bool, layout, device) -> bool:
    """Whether ``flag`` holds on every replica of the ep group."""
    return not agree_max([0 if flag else 1], layout, device)[0]


@torch.no_grad()
def idle_pass(stage, device):
    """This stage's sparse layers on no rows, in layer order: the collectives a forward pass makes
    with the ep group, for a replica that has nothing to prefill when its peers do."""
    x = torch.zeros(0, stage.cfg.hidden_size, dtype=next(stage.parameters()).dtype, device=device)
    for layer in stage.model.layers.values():
        if isinstance(layer.feed_forward, SparseMoE):
            layer.feed_forward(x)


def stand_in(gen, params, **kw) -> GenerationResult:
    """For a replica given no prompts under ep: ``gen`` (an engine's entry point) on a one-token
    prompt for one new token, beside its group, and no result of its own."""
    gen([[0]], params, **{**kw, "samples": 1, "slots": None, "limits": [1], "seq_offset": 0})
    return GenerationResult([], [], [])

