"""`meshrl run CONFIG.yaml key=value ...`: one entry point for every algorithm, under torchrun or as
one process. It joins the runtime to the planner: a config's ``calls: auto`` is searched at
start-up on the cluster the launcher gives (`meshrl.planning.search.plan_auto_calls`)."""
from __future__ import annotations

from meshrl.engine.runtime.config import load_run_config
from meshrl.engine.runtime.run import run_config as run_with
from meshrl.planning.search import plan_auto_calls


def run_config(cfg) -> dict:
    """Run a RunConfig to the end, ``calls: auto`` included; the final evaluation metrics."""
    return run_with(cfg, plan_calls=plan_auto_calls)


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
