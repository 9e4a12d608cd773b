"""Training and inference over a model stage in its layout: microbatches through the pipeline,
gradients synchronised (model, then data parallel), one optimizer step.

A loss function has the signature ``loss_fn(stage, hidden, mb) -> (loss, metrics)``; the loss must
already be normalised by the *global* count (tokens or sequences over the whole batch and all dp
ranks), and each metric likewise, so that sums over microbatches and dp ranks are global means.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from meshrl.parallel import mappings
from meshrl.parallel.data_parallel import DistributedOptimizer
from meshrl.parallel.pipeline import broadcast_from_last_stage, forward_only, to_host, train_1f1b

from .batch import PackedBatch

SCHEDULES = ("constant", "cosine", "linear")  # learning-rate schedules after warm-up


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule: what ``Trainer`` takes, and a run config's
    ``models.NAME.optim`` section (omegaconf reads these fields, so their types stay ones it knows)."""
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    zero1: bool = True
    warmup_steps: int = 0
    schedule: str = "constant"  # one of SCHEDULES
    total_steps: int | None = None  # in a run: its optimizer steps, set by the run, not the YAML
    min_lr_ratio: float = 0.0
    # mixture of experts: the load-balancing loss's coefficient (None: the checkpoint's
    # router_aux_loss_coef) and the router z-loss's (0: off)
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float = 0.0

    def lr_at(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant" or not self.total_steps:
            return self.lr
        frac = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        lo = self.lr * self.min_lr_ratio
        if self.schedule == "cosine":
            return lo + (self.lr - lo) * 0.5 * (1 + math.cos(math.pi * frac))
        if self.schedule == "linear":
            return self.lr - (self.lr - lo) * frac
        raise ValueError(f"schedule='{self.schedule}': use constant, cosine or linear")


def global_sum(value: float | torch.Tensor, group) -> float:
    t = torch.as_tensor(value, dtype=torch.float64).reshape(1).clone()
    return float(mappings.all_reduce(t, group)[0]) if group is not None else float(t[0])


def _device_of(stage):
    return stage.inv_freq.device


def _stage_step(fn):
    """Adapt ``fn(stage, hidden, mb)`` to the schedules' ``forward_step(batch, model)``."""
    def forward_step(mb: PackedBatch, model):
        hidden = model(mb.input_ids, mb.meta)
        return hidden, (lambda h: fn(model, h, mb))
    return forward_step


class Trainer:
    """Owns the optimizer of one model stage (its layout's shard of the model)."""

    def __init__(self, stage, cfg: OptimConfig):
        self.stage, self.cfg = stage, cfg
        self.layout = stage.layout
        self.opt = DistributedOptimizer(stage.named_parameters(), self.layout, lr=cfg.lr,
                                        betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                        zero1=cfg.zero1 and self.layout.dp_size > 1,
                                        max_grad_norm=cfg.max_grad_norm)
        self.steps = 0

    def step(self, microbatches: list[PackedBatch], loss_fn) -> dict:
        """Forward/backward every microbatch, then one optimizer update. Returns global metrics
        (identical on every rank of the layout)."""
        device = _device_of(self.stage)
        mbs = in_expert_step([mb.to(device) for mb in microbatches], self.layout, device)
        self.opt.set_lr(self.cfg.lr_at(self.steps))
        self.opt.zero_grad()

        def step_loss(stage, hidden, mb):  # an empty microbatch adds nothing (and has no fields)
            return loss_fn(stage, hidden, mb) if mb.num_seqs else (hidden.sum() * 0.0, {})
        with self._router_losses(mbs):
            metrics, _ = train_1f1b(_stage_step(step_loss), mbs, self.stage, self.layout,
                                    no_sync=self.opt.no_sync, device=device)
        self.stage.sync_model_grads()
        self.opt.finish_grad_sync()
        info = self.opt.step()
        self.steps += 1
        out = reduce_metrics(metrics, self.layout, device)
        if self.stage.router_losses is not None:
            out.update(self.stage.router_losses.metrics(self.layout))
        out.update(grad_norm=float(info["grad_norm"]), lr=float(info["lr"]))
        if info.get("skipped"):
            out["skipped_step"] = 1.0
        return out

    def _router_losses(self, mbs):
        """A MoE model's router losses over this step's tokens (every microbatch, every dp rank)."""
        losses = self.stage.router_losses
        if losses is None:
            return contextlib.nullcontext()
        aux = self.cfg.router_aux_loss_coef
        aux = self.stage.cfg.router_aux_loss_coef if aux is None else aux
        tokens = global_sum(sum(mb.input_ids.numel() for mb in mbs), self.layout.dp_group)
        return losses.step(max(tokens, 1.0), aux, self.cfg.router_z_loss_coef,
                           device=_device_of(self.stage))

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


def reduce_metrics(per_mb: list[dict] | None, layout, device) -> dict:
    """Sum each metric over microbatches (last stage) and dp ranks; every rank gets the result."""
    local = {}
    for m in per_mb or []:
        for k, v in m.items():
            local[k] = local.get(k, 0.0) + float(v)
    local = broadcast_from_last_stage(local if layout.is_last_stage else None, layout, device=device)
    local = local or {}
    if layout.dp_group is None:
        return dict(local)
    keys = sorted(local)
    if layout.ep_size > 1:  # a replica that ran only empty microbatches has no metrics of its own
        every = [None] * dist.get_world_size(layout.dp_group)
        dist.all_gather_object(every, keys, group=layout.dp_group)
        keys = sorted(set().union(*every))
    elif not keys:
        return {}
    t = torch.tensor([local.get(k, 0.0) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=layout.dp_group)
    return dict(zip(keys, t.tolist()))


@torch.no_grad()
def infer(stage, microbatches: list[PackedBatch], fn) -> list:
    """``fn(stage, hidden, mb)`` on every microbatch (last stage), results broadcast to all stages of
    the pipeline, moved to the CPU."""
    device = _device_of(stage)
    mbs = in_expert_step([mb.to(device) for mb in microbatches], stage.layout, device)
    out = forward_only(_stage_step(lambda st, h, mb: fn(st, h, mb) if mb.num_seqs else None),
                       mbs, stage, stage.layout, device=device)
    if out is not None:
        out = [to_host(o) for o in out[:len(microbatches)]]
    return broadcast_from_last_stage(out, stage.layout, device=device)


def in_expert_step(mbs: list[PackedBatch], layout, device) -> list[PackedBatch]:
    """Under expert parallelism the replicas of an ep group meet at every sparse layer of every
    microbatch: each runs as many microbatches as the one with the most (a replica given none
    too), the extra ones empty (no tokens: no loss, no gradient, no router statistics)."""
    if layout.ep_size == 1:
        return mbs
    n = mappings.group_max([len(mbs)], layout.ep_group, device)[0]
    return mbs + [PackedBatch.empty().to(device) for _ in range(n - len(mbs))]


def global_token_count(microbatches: list[PackedBatch], layout, key: str = "loss_mask") -> float:
    local = sum(float(mb.tokens[key].sum()) for mb in microbatches)
    return global_sum(local, layout.dp_group)


def global_seq_count(microbatches: list[PackedBatch], layout, key: str = "loss_mask") -> float:
    """Sequences with at least one counted token (``key``) over every microbatch and dp rank: the
    normaliser of a sequence-mean loss."""
    from meshrl.engine.algorithms.reductions import segment_sum
    local = sum(float((segment_sum(mb.tokens[key], mb.meta.cu_seqlens) > 0).sum()) for mb in microbatches)
    return global_sum(local, layout.dp_group)
