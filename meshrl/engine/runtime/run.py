"""`meshrl run CONFIG.yaml key=value ...`: one entry point for every algorithm, under torchrun or as
one process."""
from __future__ import annotations

from . import dpo, policy_gradient, supervised
from .config import load_run_config
from .context import RunContext

LOOPS = {"sft": supervised.run_sft, "rm": supervised.run_rm, "dpo": dpo.run,
         "ppo": policy_gradient.run, "grpo": policy_gradient.run}


def run_config(cfg) -> dict:
    """Run a RunConfig to the end (resuming from its run_dir when a checkpoint is there); return
    the final evaluation metrics."""
    ctx = RunContext(cfg)
    try:
        return LOOPS[cfg.algorithm](ctx)
    finally:
        ctx.close()


def add_arguments(p):
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides (omegaconf dotlist)")


def run(args) -> int:
    result = run_config(load_run_config(args.config, args.overrides))
    from meshrl.engine.distributed import is_main, shutdown
    if is_main() and result:
        print("final: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
    shutdown()
    return 0
