"""One run of any algorithm: its RunContext, then its loop, on every rank."""
from __future__ import annotations

from . import dpo, policy_gradient, supervised
from .context import RunContext

LOOPS = {"sft": supervised.run_sft, "rm": supervised.run_rm, "dpo": dpo.run,
         "ppo": policy_gradient.run, "grpo": policy_gradient.run}


def run_config(cfg, *, plan_calls=None) -> dict:
    """Run a RunConfig to the end (resuming from its run_dir when a checkpoint is there); return
    the final evaluation metrics. ``plan_calls`` chooses the layouts of ``calls: auto``
    (`RunContext`)."""
    ctx = RunContext(cfg, plan_calls=plan_calls)
    try:
        return LOOPS[cfg.algorithm](ctx)
    finally:
        ctx.close()
