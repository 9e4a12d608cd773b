"""meshrl command line: run | generate | plan | bench | plot | demo | study."""
from __future__ import annotations

import argparse
import os
import sys


class CommandError(Exception):
    """Raised for bad input anywhere below; printed as one line."""


# (command, module with add_arguments/run, help)
COMMANDS = [
    ("run", "meshrl.engine.runtime.run", "train with a YAML config (sft, rm, dpo, ppo, grpo)"),
    ("generate", "meshrl.engine.generate_job", "sample completions for JSONL prompts"),
    ("plan", "meshrl.engine.runtime.plan", "dry run on the CPU: memory per GPU, reallocation, step estimate"),
    ("bench", "meshrl.engine.runtime.bench",
     "a few steps of a ppo, grpo, sft, rm or offline dpo run; measured per-call seconds vs the plan"),
    ("plot", "meshrl.engine.runtime.plot", "PNG curves from RUN_DIR/metrics.jsonl"),
    ("demo", "meshrl.study.demo", "the study in miniature on CPU: SFT, then PPO and DPO"),
    ("study", "meshrl.study.study", "SFT/DPO/DPO+SFT/DPO-Iter/PPO and the PPO ablation, over seeds"),
]


def _parser(argv) -> argparse.ArgumentParser:
    """Only the chosen command's module is imported (the lent GPU image lacks some dependencies of
    the others, e.g. omegaconf for `run`); ``--help`` lists them all."""
    import importlib
    p = argparse.ArgumentParser(prog="meshrl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    chosen = [c for c in COMMANDS if argv and argv[0] == c[0]] or COMMANDS
    for name, module, help_text in chosen:
        mod = importlib.import_module(module)
        cmd = sub.add_parser(name, help=help_text)
        mod.add_arguments(cmd)
        cmd.set_defaults(func=mod.run)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(argv).parse_args(argv)
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
