"""meshrl command line: run | generate | plan | bench | plot | demo | study."""
from __future__ import annotations

import argparse
import os
import sys


class CommandError(Exception):
    """Raised for bad input anywhere below; printed as one line."""


def _parser() -> argparse.ArgumentParser:
    from meshrl.engine import generate_job
    p = argparse.ArgumentParser(prog="meshrl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="sample completions for JSONL prompts")
    generate_job.add_arguments(g)
    g.set_defaults(func=generate_job.run)
    from meshrl.engine.runtime import plot, run
    r = sub.add_parser("run", help="train with a YAML config (sft, rm, dpo, ppo, grpo)")
    run.add_arguments(r)
    r.set_defaults(func=run.run)
    pl = sub.add_parser("plot", help="PNG curves from RUN_DIR/metrics.jsonl")
    plot.add_arguments(pl)
    pl.set_defaults(func=plot.run)
    from meshrl.engine.runtime import bench, plan
    pn = sub.add_parser("plan", help="dry run on the CPU: memory per GPU, reallocation, step estimate")
    plan.add_arguments(pn)
    pn.set_defaults(func=plan.run)
    bn = sub.add_parser("bench", help="run a few PPO iterations; measured per-call seconds vs the plan")
    bench.add_arguments(bn)
    bn.set_defaults(func=bench.run)
    from meshrl.study import demo, study
    dm = sub.add_parser("demo", help="the study in miniature on CPU: SFT, then PPO and DPO")
    demo.add_arguments(dm)
    dm.set_defaults(func=demo.run)
    st = sub.add_parser("study", help="SFT/DPO/DPO+SFT/DPO-Iter/PPO and the PPO ablation, over seeds")
    study.add_arguments(st)
    st.set_defaults(func=study.run)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from meshrl.engine.data.jsonl import DataError
    from meshrl.engine.model.config import ConfigError
    from meshrl.engine.runtime.config import RunConfigError
    from meshrl.parallel.layout import LayoutError
    try:
        return args.func(args) or 0
    except (DataError, ConfigError, LayoutError, RunConfigError, ValueError, FileNotFoundError) as e:
        if os.environ.get("MESHRL_DEBUG"):
            raise
        print(f"meshrl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
