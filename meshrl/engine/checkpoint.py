"""Resumable checkpoints with torch.distributed.checkpoint (DCP): every rank writes only its shards.

Model tensors are keyed by their ShardSpec (name and range), so shards of one tensor never collide
and replicated copies share a key and are written once. Optimizer states carry their own per-rank
keys. Host-side state (step counters, the training data's record count, KL controller, running
moments) travels as a JSON file written by rank 0; each rank's random generators (torch, CUDA,
numpy, Python) as ``rng/rank_R.pt``. A checkpoint becomes visible only when complete: it is
written to ``step_N.tmp`` and renamed, and ``latest`` is updated last, so a run killed mid-save
resumes from the previous one.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; one line saying why and what to do."""


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


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every save and load that it assumes one process when torch.distributed is not
    initialised; one process is what a plain `meshrl run` is, so that warning says nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _save_rng(folder: str):
    """This rank's generators: nothing meshrl samples depends on them (sampling noise and data
    order are counter-based), but a user's verifier or reward function may."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    os.makedirs(os.path.join(folder, "rng"), exist_ok=True)
    torch.save(state, os.path.join(folder, "rng", f"rank_{_rank()}.pt"))


def _load_rng(folder: str):
    path = os.path.join(folder, "rng", f"rank_{_rank()}.pt")
    if not os.path.exists(path):  # saved before generators were kept
        return
    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save(run_dir: str, step: int, models: dict, trainers: dict, host_state: dict, *,
         keep: int = 0) -> str:
    """Collective over every rank that holds any of ``models``. Returns the checkpoint path. With
    ``keep`` > 0, older complete checkpoints beyond the newest ``keep`` are removed once this one
    is in place and ``latest`` names it."""
    final = os.path.join(run_dir, "checkpoints", f"step_{step}")
    tmp = final + ".tmp"
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    _barrier()
    with _single_process_quiet():
        dcp.save(_state(models, trainers), checkpoint_id=tmp)
    _save_rng(tmp)
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
        if keep > 0:
            older = [path for s, path in _complete(os.path.dirname(final)) if s < step]
            for path in older[:max(0, len(older) - (keep - 1))]:
                shutil.rmtree(path, ignore_errors=True)
    _barrier()
    return final


def _complete(folder: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in ``folder`` (renamed from .tmp: host state in)."""
    out = []
    for name in os.listdir(folder):
        m = re.fullmatch(r"step_(\d+)", name)
        if m and os.path.isfile(os.path.join(folder, name, "host_state.json")):
            out.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(out)


def latest(run_dir: str) -> str | None:
    """The checkpoint ``latest`` names; if it has gone or is incomplete (copied or removed in part
    by hand), the newest complete one left (with a warning), and an error when none is, rather
    than a silent fresh start over the run's logs."""
    folder = os.path.join(run_dir, "checkpoints")
    path = os.path.join(folder, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    ckpt = os.path.join(folder, name)
    if os.path.isfile(os.path.join(ckpt, "host_state.json")):
        return ckpt
    why = "incomplete (no host_state.json)" if os.path.isdir(ckpt) else "missing"
    left = _complete(folder)
    if not left:
        raise CheckpointError(f"{path} names {name}, which is {why}, and no other checkpoint is "
                              "complete: restore it, or set resume=false to start afresh (which "
                              "replaces the run's metrics)")
    warnings.warn(f"{path} names {name}, which is {why}: resuming from {left[-1][1]}", stacklevel=2)
    return left[-1][1]


def _check_layouts(ckpt: str, host: dict, layouts: dict | None):
    """Shards are keyed by their ranges, so a checkpoint loads only into the layouts it was saved
    from: say so, naming the model, before DCP fails on a missing key."""
    saved = host.get("layouts")
    if layouts is None or saved is None:
        return
    for name, now in layouts.items():
        if name in saved and saved[name] != now:
            raise CheckpointError(f"{ckpt} holds model {name} in layout {_describe(saved[name])}; "
                                  f"this run places it in {_describe(now)}: resume with the saved "
                                  "layout (its calls' ranks, tp, pp, ep), or give a new run_dir")


def _describe(layout: dict) -> str:
    r = layout["ranks"]
    span = f"{r[0]}-{r[-1]}" if r == list(range(r[0], r[-1] + 1)) else str(r)
    ep = f" ep={layout['ep']}" if layout.get("ep", 1) > 1 else ""
    return f"tp={layout['tp']} pp={layout['pp']} dp={layout['dp']}{ep} on ranks {span}"


@torch.no_grad()
def load(ckpt: str, models: dict, trainers: dict, layouts: dict | None = None) -> dict:
    """Restore models and optimizers in place (same layouts as saved, which ``layouts`` — as
    ``save`` records them in the host state — checks first); return the host state."""
    with open(os.path.join(ckpt, "host_state.json")) as f:
        host = json.load(f)
    _check_layouts(ckpt, host, layouts)
    state = _state(models, trainers)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=ckpt)
    except (RuntimeError, CheckpointException) as e:  # a checkpoint from before layouts were recorded
        if "Missing key" not in str(e):
            raise
        raise CheckpointError(f"{ckpt} does not hold this run's shards (saved with other models or "
                              "layouts): resume with the saved config, or give a new run_dir") from None
    for name, trainer in trainers.items():
        prefix = f"optim/{name}/"
        trainer.opt.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                     if k.startswith(prefix)})
    for name, trainer in trainers.items():
        trainer.steps = int(host["trainer_steps"][name])
    _load_rng(ckpt)
    return host
