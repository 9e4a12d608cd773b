"""Resumable checkpoints with torch.distributed.checkpoint (DCP): every rank writes only its shards.

Model tensors are keyed by their ShardSpec (name and range), so shards of one tensor never collide
and replicated copies share a key and are written once. Optimizer states carry their own per-rank
keys. Host-side state (step counters, data order, RNG, controllers) travels as a JSON file written
by rank 0. A checkpoint becomes visible only when complete: it is written to ``step_N.tmp`` and
renamed, and ``latest`` is updated last, so a run killed mid-save resumes from the previous one.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp


def _model_state(prefix: str, stage) -> dict:
    out = {}
    for p in stage.parameters():
        s = p.shard_spec
        rng = "full" if s.dim is None else f"d{s.dim}_{s.start}-{s.stop}"
        out[f"{prefix}/{s.name}/{rng}"] = p.data
    return out


def _state(models: dict, trainers: dict) -> dict:
    state = {}
    for name, stage in models.items():
        state.update(_model_state(f"model/{name}", stage))
    for name, trainer in trainers.items():
        for k, v in trainer.state_dict()["optimizer"].items():
            state[f"optim/{name}/{k}"] = v
    return state


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save(run_dir: str, step: int, models: dict, trainers: dict, host_state: dict) -> str:
    """Collective over every rank that holds any of ``models``. Returns the checkpoint path."""
    final = os.path.join(run_dir, "checkpoints", f"step_{step}")
    tmp = final + ".tmp"
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    _barrier()
    dcp.save(_state(models, trainers), checkpoint_id=tmp)
    steps = {n: t.steps for n, t in trainers.items()}
    if dist.is_initialized():  # rank 0 writes the host state but may hold none of the trainers
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, steps)
        steps = {k: v for part in parts for k, v in part.items()}
    host = dict(host_state, step=step, trainer_steps=steps)
    if _rank0():
        with open(os.path.join(tmp, "host_state.json"), "w") as f:
            json.dump(host, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(run_dir, "checkpoints", "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(run_dir, "checkpoints", "latest.tmp"),
                   os.path.join(run_dir, "checkpoints", "latest"))
    _barrier()
    return final


def latest(run_dir: str) -> str | None:
    path = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        ckpt = os.path.join(run_dir, "checkpoints", f.read().strip())
    return ckpt if os.path.isdir(ckpt) else None


@torch.no_grad()
def load(ckpt: str, models: dict, trainers: dict) -> dict:
    """Restore models and optimizers in place (same layouts as saved); return the host state."""
    state = _state(models, trainers)
    dcp.load(state, checkpoint_id=ckpt)
    for name, trainer in trainers.items():
        prefix = f"optim/{name}/"
        trainer.opt.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                     if k.startswith(prefix)})
    with open(os.path.join(ckpt, "host_state.json")) as f:
        host = json.load(f)
    for name, trainer in trainers.items():
        trainer.steps = int(host["trainer_steps"][name])
    return host
