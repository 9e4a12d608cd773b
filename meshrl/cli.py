"""meshrl command line: run | generate | plan | bench | plot | demo | study."""
from __future__ import annotations

import argparse
import os
import sys


# (command, module with add_arguments/run, help)
COMMANDS = [
    ("run", "meshrl.launch", "train with a YAML config (sft, rm, dpo, ppo, grpo)"),
    ("generate", "meshrl.engine.generation.job", "sample completions for JSONL prompts"),
    ("plan", "meshrl.planning.plan", "dry run on the CPU: memory per GPU, reallocation, step estimate"),
    ("bench", "meshrl.planning.bench",
     "a few steps of a ppo, grpo, sft, rm or offline dpo run; measured per-call seconds vs the plan"),
    ("plot", "meshrl.engine.runtime.plot", "PNG curves from RUN_DIR/metrics.jsonl"),
    ("demo", "meshrl.study.demo", "the study in miniature on CPU: SFT, then PPO and DPO"),
    ("study", "meshrl.study.study", "SFT/DPO/DPO+SFT/DPO-Iter/PPO and the PPO ablation, over seeds"),
]


def _parser(argv) -> tuple[argparse.ArgumentParser, dict]:
    """The parser and its commands' parsers. Only the chosen command's module is imported (the lent
    GPU image lacks some dependencies of the others, e.g. omegaconf for `run`); ``--help`` lists
    them all."""
    import importlib
    p = argparse.ArgumentParser(prog="meshrl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    chosen = [c for c in COMMANDS if argv and argv[0] == c[0]] or COMMANDS
    commands = {}
    for name, module, help_text in chosen:
        mod = importlib.import_module(module)
        commands[name] = cmd = sub.add_parser(name, help=help_text)
        mod.add_arguments(cmd)
        cmd.set_defaults(func=mod.run, command=name)
    return p, commands


def parse(argv) -> argparse.Namespace:
    """``key=value`` overrides may come before or after options (``plan X.yaml --device cpu a=1``):
    a command's own parser reads its arguments intermixed, which argparse cannot do through
    subcommands."""
    p, commands = _parser(argv)
    if argv and argv[0] in commands:
        return commands[argv[0]].parse_intermixed_args(argv[1:])
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    from meshrl.engine.data.jsonl import DataError
    from meshrl.engine.model.config import ConfigError
    from meshrl.engine.runtime.config import RunConfigError
    from meshrl.engine.runtime.executor import LaunchedCallError
    from meshrl.parallel.layout import LayoutError
    # Every rank checks the same config, data and layouts, so under torchrun those errors are
    # reported once per node (files can differ between nodes), by its first local rank; other
    # errors may be a rank's own, and each rank reports its own.
    same_everywhere = (DataError, ConfigError, LayoutError, RunConfigError, LaunchedCallError)
    try:
        return args.func(args) or 0
    except (*same_everywhere, ValueError, FileNotFoundError) as e:
        if os.environ.get("MESHRL_DEBUG"):
            raise
        rank = int(os.environ.get("RANK", "0"))
        if not isinstance(e, same_everywhere) or int(os.environ.get("LOCAL_RANK", "0")) == 0:
            who = "" if rank == 0 else f" (rank {rank})"
            print(f"meshrl {args.command}{who}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
