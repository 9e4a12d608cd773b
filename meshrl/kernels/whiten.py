"""Masked advantage whitening with statistics over a whole (data-parallel) batch.

PPO whitens advantages over the global batch: the mean and the biased variance are taken over the
masked elements of every rank in `group`, so the result does not depend on how the batch was split.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def masked_whiten(x: torch.Tensor, mask: torch.Tensor | None = None, *, group=None,
                  shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean)·rsqrt(var + eps) with masked, biased mean/var reduced across `group`.

    group=None whitens over this process's data only; layouts pass their data-parallel group.

    shift_mean=False adds the mean back (scale only). Every element of `x` is transformed, masked
    or not, as TRL and DeepSpeed-Chat do; callers zero what they ignore. Returns fp32.
    """
    xf = x.float()
    w = torch.ones_like(xf) if mask is None else mask.to(torch.float32).expand_as(xf)
    # One all-reduce of (count, Σx, Σx²) in float64: a single collective, and float64 keeps
    # E[x²] − E[x]² exact enough for any realistic advantage scale.
    stats = torch.stack([w.sum(), (w * xf).sum(), (w * xf * xf).sum()]).double()
    if group is not None:  # None means this process alone, not torch's default WORLD group
        dist.all_reduce(stats, group=group)
    count, total, total_sq = stats.unbind(0)
    if count.item() == 0:
        raise ValueError("masked_whiten: the mask selects no elements on any rank")
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    out = (xf - mean.float()) * torch.rsqrt(var.float() + eps)
    return out + mean.float() if not shift_mean else out
