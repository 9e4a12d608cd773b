"""The services of one run, on every rank: metrics (JSONL, TensorBoard and the configured trackers,
written by rank 0), per-call timings, progress bars, checkpoints and Hugging Face exports, and the
record of what each step executed. They read the executor's models and trace; they issue no model
call of their own."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from meshrl.engine import checkpoint
from meshrl.engine.model import save_hf

from .config import RunConfig
from .metrics import MetricsLogger, progress
from .placement import all_gather_objects


class RunServices:
    """Metrics, timings, progress, checkpoints. ``start_logging(resume_step)`` opens the metrics
    once the run knows the step it resumes from (the JSONL and the trackers continue from there)."""

    def __init__(self, cfg: RunConfig, *, main: bool, device, watchdog):
        self.cfg, self.main, self.device, self.watchdog = cfg, main, device, watchdog
        self.timings: dict[str, float] = {}
        self.logger = None
        # False while a call computes on another thread of this rank (async generation): that
        # thread may be capturing a CUDA graph, and this thread has no device work of its own
        self.may_sync_device = lambda: True

    def start_logging(self, resume_step: int):
        self.logger = MetricsLogger(self.cfg.run_dir, enabled=self.main,
                                    tensorboard=self.cfg.logging.tensorboard,
                                    resume_step=resume_step if resume_step else None,
                                    trackers=self.cfg.logging, config=self.cfg)

    # ---- timings --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def timed(self, call: str, label: str | None = None):
        """Accumulate this block's wall time (device work included) under ``time/<call>``; the
        loop logs the sums every step, which is what `meshrl bench` and `meshrl plan` compare.
        The watchdog reports a stall inside it as ``label`` (default: ``call``)."""
        t0 = time.perf_counter()
        try:
            with self.watchdog.inside(label or call):
                yield
            # only on success: an error path must not wait on the device (a generation thread
            # may be stuck in a collective with a failed peer)
            if self.device.type != "cpu" and self.may_sync_device():
                torch.accelerator.synchronize()
        finally:
            self.add_time(call, time.perf_counter() - t0)

    def add_time(self, call: str, seconds: float):
        """Add seconds measured elsewhere (a call computing on its own thread) under ``time/<call>``."""
        self.timings[call] = self.timings.get(call, 0.0) + seconds

    def pop_timings(self) -> dict:
        """This step's ``time/<call>`` sums, each the slowest rank's (collective: a call whose
        mesh leaves out the logging rank is timed where it ran)."""
        slowest: dict[str, float] = {}
        for part in all_gather_objects(self.timings):
            for k, v in part.items():
                slowest[k] = max(slowest.get(k, 0.0), v)
        self.timings = {}
        return {f"time/{k}": v for k, v in sorted(slowest.items())}

    # ---- metrics and progress -------------------------------------------------------------------
    def log(self, step: int, metrics: dict, phase: str = "train"):
        self.logger.log(step, metrics, phase=phase)

    def progress(self, total: int, desc: str, initial: int = 0):
        # redirected output gets a line every 10 s, not one per step
        quiet = {} if sys.stderr.isatty() else {"mininterval": 10.0}
        bar = progress(total, desc=desc, enabled=self.main and self.cfg.logging.progress, **quiet)
        if initial:
            bar.update(initial)
        return bar

    def record_dataflow(self, step: int, executor, executed: list[dict], first_step: int):
        """Add what step ``step`` executed (its gathers in order, the views it refilled, the blends)
        to run_dir/dataflow.json, beside the dataflow the run declares: what `meshrl plan` prices.
        The loop records a run's first two steps (the first fills every view once; the second is
        the steady state the plan's per-step counts describe)."""
        if not self.main:
            return
        path = os.path.join(self.cfg.run_dir, "dataflow.json")
        doc = {"algorithm": self.cfg.algorithm,
               "declared": [{"phase": i, "call": c.name, "layout": c.config_call, "kind": c.kind,
                             "every": c.every} for i, c in executor.rows()],
               "blends": [{"dst": b.dst, "src": b.src, "every": b.every}
                          for b in executor.flow.active_blends(self.cfg, executor.calls)],
               "steps": {}}
        if os.path.exists(path) and step != first_step:
            with open(path) as f:
                doc["steps"] = json.load(f)["steps"]
        doc["steps"][str(step)] = executed
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self, step: int, executor, host_state: dict):
        """A checkpoint of every held shard, optimizer state and ``host_state`` at ``step``."""
        with self.watchdog.inside(f"saving checkpoints/step_{step}"):
            checkpoint.save(self.cfg.run_dir, step, *executor.held(),
                            dict(host_state, layouts=executor.home_layouts()),
                            keep=self.cfg.logging.keep_checkpoints)

    def resume(self, executor) -> dict | None:
        """The latest checkpoint's host state, its shards loaded into the executor's models (None
        when the run starts fresh)."""
        if not self.cfg.resume:
            return None
        ckpt = checkpoint.latest(self.cfg.run_dir)
        if ckpt is None:
            return None
        host_state = checkpoint.load(ckpt, *executor.held(), layouts=executor.home_layouts())
        for m in executor.models.values():
            m.version += 1  # views refill from the restored weights
        if self.main:
            print(f"resumed from {ckpt}")
        return host_state

    def save_hf_models(self, executor):
        """Trained models as Hugging Face directories under run_dir/hf/NAME (tokenizer copied)."""
        tok_dir = next((m.source_dir for m in executor.models.values() if m.source_dir), None)
        tok_dir = tok_dir or self.cfg.extra.get("tokenizer")
        for name, m in executor.trained_models().items():
            if m.stage is not None:
                save_hf(m.stage, os.path.join(self.cfg.run_dir, "hf", name), tokenizer_dir=tok_dir)
        if dist.is_initialized():
            dist.barrier()

    def close(self):
        if self.logger is not None:
            self.logger.close()
