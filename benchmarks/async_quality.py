"""Does asynchronous PPO learn as well as the synchronous loop? PPO on the bundled arithmetic task
from the demo's SFT model (examples/ppo_arithmetic.yaml), for seeds 1, 2, 3 and
``async.max_staleness`` 0 (synchronous), 1 and 2, every cell the same number of samples
(iterations × batch size) and the same layout: the actor's generation on rank 0, every other
call on rank 1, two gloo ranks on CPU. Prints each cell's final held-out pass rate (greedy, the
200 held-out prompts), each N's mean, whether each async run lies within the synchronous runs'
[min, max] across seeds, the mean steady-state step time per N and the SFT model's pass rate.

    make demo                                         # once: the SFT model and the data
    python benchmarks/async_quality.py                # 9 cells, about 2 minutes each on 2 CPU cores
    python benchmarks/async_quality.py --iterations 30 --seeds 1,2

Each cell runs in its own torchrun launch under runs/async_quality/seed{S}_n{N}; a cell whose
metrics.jsonl already holds the final evaluation is not rerun, so an interrupted study resumes
(an unfinished cell, or one finished with other iterations, starts again from scratch).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from async_rl import steady_state  # noqa: E402 - the steps averaged as the step-time benchmark does

EXAMPLE = os.path.join(ROOT, "examples", "ppo_arithmetic.yaml")
SFT = os.path.join(ROOT, "runs", "demo", "sft")
STUDY = os.path.join(ROOT, "runs", "async_quality")
# the same layout in every cell: generation on rank 0 of its own, the rest on rank 1
LAYOUT = {"actor_gen": "0", "actor_train": "1", "ref_inf": "1", "critic_inf": "1", "critic_train": "1"}


def overrides(seed: int, n: int, a) -> list[str]:
    return [f"seed={seed}", f"async.max_staleness={n}", f"run_dir={cell_dir(seed, n)}",
            f"ppo.iterations={a.iterations}", f"ppo.batch_size={a.batch_size}",
            "save_hf=false", "logging.progress=false", "logging.tensorboard=false",
            "logging.save_every=0", f"logging.eval_every={a.eval_every}",
            *[f"calls.{c}.ranks={r}" for c, r in LAYOUT.items()]]


def cell_dir(seed: int, n: int) -> str:
    return os.path.join(STUDY, f"seed{seed}_n{n}")


def rows(run_dir: str) -> list[dict]:
    from meshrl.engine.runtime.metrics import read_metrics
    try:
        return read_metrics(run_dir)
    except FileNotFoundError:
        return []


def final_pass_rate(run_dir: str, iterations: int) -> float | None:
    """The pass rate of the evaluation at the run's last step, None while it has none."""
    ev = [r for r in rows(run_dir) if r.get("phase") == "eval" and r["step"] == iterations
          and r.get("pass_rate") is not None]
    return ev[-1]["pass_rate"] if ev else None


def worker(cfg_json: str):
    """Under torchrun: one cell."""
    from meshrl.engine.runtime.config import load_run_config
    from meshrl.engine.runtime.run import run_config
    with open(cfg_json) as f:
        spec = json.load(f)
    run_config(load_run_config(spec["path"], spec["overrides"]))


def run_cell(seed: int, n: int, a) -> float:
    """Run one cell (unless finished); returns its wall seconds (0 when cached)."""
    d = cell_dir(seed, n)
    if final_pass_rate(d, a.iterations) is not None:
        return 0.0
    if os.path.exists(d):  # unfinished or another length: start over, not resume
        shutil.rmtree(d)
    os.makedirs(d)
    spec = os.path.join(d, "cell.json")
    with open(spec, "w") as f:
        json.dump({"path": EXAMPLE, "overrides": overrides(seed, n, a)}, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(a.port), os.path.abspath(__file__), "--worker", spec]
    t0 = time.perf_counter()
    with open(os.path.join(d, "stdout.log"), "w") as out, open(os.path.join(d, "stderr.log"), "w") as err:
        proc = subprocess.run(cmd, stdout=out, stderr=err, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MESHRL_DEVICE": "cpu"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or final_pass_rate(d, a.iterations) is None:
        with open(os.path.join(d, "stderr.log")) as f:
            print(f.read()[-3000:], file=sys.stderr)
        raise SystemExit(f"cell seed={seed} max_staleness={n} failed (rc {proc.returncode}); "
                         f"logs in {d}/stderr.log")
    return wall


def sft_pass_rate() -> float | None:
    ev = [r for r in rows(SFT) if r.get("phase") == "eval" and r.get("pass_rate") is not None]
    return ev[-1]["pass_rate"] if ev else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=60, help="PPO iterations of every cell")
    ap.add_argument("--batch-size", type=int, default=128, help="prompts per iteration, every cell")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--modes", default="0,1,2", help="async.max_staleness values (0: synchronous)")
    ap.add_argument("--eval-every", type=int, default=0, help="0: only the final evaluation")
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the step time")
    ap.add_argument("--port", type=int, default=29517, help="torchrun's master port")
    ap.add_argument("--worker", metavar="CELL_JSON", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)
    if not os.path.isdir(os.path.join(SFT, "hf", "actor")):
        print("runs/demo/sft/hf/actor is missing: run `make demo` first", file=sys.stderr)
        return 1
    seeds = [int(s) for s in a.seeds.split(",")]
    modes = [int(n) for n in a.modes.split(",")]
    t_all = time.perf_counter()
    cells = {}
    for n in modes:
        for s in seeds:
            wall = run_cell(s, n, a)
            d = cell_dir(s, n)
            cells[(s, n)] = {"pass_rate": final_pass_rate(d, a.iterations),
                             "step_s": steady_state(d, a.skip)["step_s"], "wall_s": wall}
            print(f"seed {s} max_staleness {n}: pass rate {cells[(s, n)]['pass_rate']:.3f}, "
                  f"step {cells[(s, n)]['step_s']:.2f} s" + (f", {wall:.0f} s" if wall else " (cached)"),
                  flush=True)
    sft = sft_pass_rate()
    sync = [cells[(s, 0)]["pass_rate"] for s in seeds] if 0 in modes else []
    lo, hi = (min(sync), max(sync)) if sync else (None, None)
    print()
    print(f"PPO on the arithmetic task from the demo SFT model (examples/ppo_arithmetic.yaml): "
          f"{a.iterations} iterations x {a.batch_size} prompts = {a.iterations * a.batch_size} samples "
          f"per run; actor_gen on rank 0, the other calls on rank 1 (2 gloo ranks, CPU); "
          f"final greedy held-out pass rate")
    print(f"SFT start pass rate: {sft:.3f}" if sft is not None else "SFT start pass rate: n/a")
    if sync:
        print(f"synchronous spread (min, max over seeds {a.seeds}): [{lo:.3f}, {hi:.3f}]")
    head = "".join(f"{'seed ' + str(s):>10}" for s in seeds)
    print(f"{'mode':<22}{head}{'mean':>8}{'step s':>9}  within the sync spread")
    summary = {}
    for n in modes:
        rates = [cells[(s, n)]["pass_rate"] for s in seeds]
        mean = sum(rates) / len(rates)
        step = sum(cells[(s, n)]["step_s"] for s in seeds) / len(seeds)
        within = [lo - 1e-9 <= r <= hi + 1e-9 for r in rates] if sync else []
        name = "synchronous (N=0)" if n == 0 else f"async N={n}"
        verdict = "-" if n == 0 or not sync else "/".join("yes" if w else "no" for w in within)
        print(f"{name:<22}{''.join(f'{r:>10.3f}' for r in rates)}{mean:>8.3f}{step:>9.2f}  {verdict}")
        summary[str(n)] = {"pass_rates": rates, "mean": mean, "step_s": step, "within_sync": within}
    total = time.perf_counter() - t_all
    print(f"wall time {total:.0f} s (cells run now: {sum(1 for c in cells.values() if c['wall_s'])})")
    from harness import RESULTS
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "async_quality-cpu-gloo.json")  # *-cpu-* results are not committed
    with open(path, "w") as f:
        json.dump({"args": {k: v for k, v in vars(a).items() if k != "worker"}, "sft_pass_rate": sft,
                   "sync_spread": [lo, hi], "modes": summary,
                   "cells": {f"seed{s}_n{n}": c for (s, n), c in cells.items()}}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
