"""Stateful helpers of PPO: running moments for value normalisation and the EMA reference update."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist


class RunningMoments:
    """Running mean and std of a stream (e.g. PPO returns), merged with Chan's parallel update.

    Each ``update`` reduces the batch to (count, mean, M2) — all-reduced over ``group`` when one
    is given, so every rank holds the same statistics — and merges it with the running
    (count, mean, M2). The batch is reduced in two all-reduces, (sum, count) and then the sum of
    squares *about the batch mean*, in float64: a raw sum of squares cancels catastrophically when
    |mean| ≫ std (returns of 1e4 ± 1 lose 8 digits). ``std`` is the population (biased) std, as in
    the whitening convention.
    """

    def __init__(self, eps: float = 1e-5):
        self.eps = eps
        self.mean = 0.0
        self.m2 = 0.0
        self.count = 0.0

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None, *,
               group: dist.ProcessGroup | None = None) -> tuple[float, float]:
        """Merge a batch; returns the batch's (mean, population std) over all ranks of ``group``."""
        x = x.detach().to(torch.float64).reshape(-1)
        if mask is not None:
            x = x[mask.reshape(-1).bool()]
        count = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
        total, n = self._all_sum(torch.stack([x.sum(), count]), group).tolist()
        if n == 0:
            return self.mean, self.std
        batch_mean = total / n
        batch_m2 = self._all_sum(((x - batch_mean) ** 2).sum(), group).item()
        delta = batch_mean - self.mean
        new_count = self.count + n
        self.mean += delta * n / new_count
        self.m2 += batch_m2 + delta * delta * self.count * n / new_count
        self.count = new_count
        return batch_mean, math.sqrt(batch_m2 / n)

    @staticmethod
    def _all_sum(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        if group is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    def _scale(self) -> float:
        return max(self.std, self.eps)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self._scale()

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._scale() + self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "m2": self.m2, "count": self.count, "eps": self.eps}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.m2 = float(state["mean"]), float(state["m2"])
        self.count, self.eps = float(state["count"]), float(state["eps"])


@torch.no_grad()
def ema_update_(ref_params: Iterable[torch.Tensor], actor_params: Iterable[torch.Tensor],
                alpha: float) -> None:
    """In place, for each pair: ref ← α·ref + (1 − α)·actor (the EMA reference model).

    Low-precision refs are updated through fp32 and rounded once. That does not save an update
    smaller than half a bf16 ulp of ref (with α = 0.999 a step moves ref by 0.1% of the gap): keep
    the reference in fp32 if its drift must accumulate exactly.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    refs, actors = list(ref_params), list(actor_params)
    if len(refs) != len(actors):
        raise ValueError(f"{len(refs)} reference tensors but {len(actors)} actor tensors")
    for i, (ref, actor) in enumerate(zip(refs, actors)):
        if ref.shape != actor.shape:
            raise ValueError(f"tensor {i}: reference shape {tuple(ref.shape)} "
                             f"!= actor shape {tuple(actor.shape)}")
        if ref.dtype in (torch.float32, torch.float64):
            ref.lerp_(actor.to(ref.dtype), 1.0 - alpha)
        else:
            ref.copy_(ref.float().lerp_(actor.float(), 1.0 - alpha))
