"""Synchronous vs asynchronous PPO, side by side in one launch: two gloo ranks, the actor's
generation on rank 0 and every other call on rank 1 (one core each; more ranks than cores would
hide the overlap), the same tiny config run with ``async.max_staleness`` 0, then 1 (and 2).
Prints each mode's steady-state step time, the ratio to the synchronous step, and the busy
fraction of each mesh (the share of a step it computes; idle time is what async removes).

    python benchmarks/async_rl.py                     # about 1 minute on 2 CPU cores
    python benchmarks/async_rl.py --iterations 10 --modes 0,1,2

The config is sized so that generation and training take similar time (the case async is for:
its step is the longer of the two, the synchronous step their sum). The busy fractions come from
the run's own timers: the generation mesh's ``time/actor_gen`` and the time the other ranks
waited for it (``time/wait/actor_gen``); under the synchronous loop the generation mesh is busy
for ``time/actor_gen`` and the training ranks for the rest of the step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def base_config(d: str, a) -> dict:
    """PPO on the arithmetic task from a scratch model of the demo's size (no download); step
    times do not depend on what the weights learned, and ``min_new_tokens`` fixes the lengths."""
    from meshrl.engine.data.jsonl import write_jsonl
    from meshrl.engine.tasks import make_dataset
    from meshrl.study.setup import init_scratch_model
    model = init_scratch_model(os.path.join(d, "model"), seed=0)
    write_jsonl(os.path.join(d, "prompts.jsonl"), make_dataset(1024, seed=1, digits=(1, 2)))
    calls = {"actor_gen": ("actor", "0"), "actor_train": ("actor", "1"), "ref_inf": ("ref", "1"),
             "critic_inf": ("critic", "1"), "critic_train": ("critic", "1")}
    return {"algorithm": "ppo", "seed": 1, "save_hf": False,
            "models": {"actor": {"path": model}, "critic": {"path": model}, "ref": {"path": model}},
            "calls": {c: {"model": m, "ranks": r} for c, (m, r) in calls.items()},
            "data": {"train": os.path.join(d, "prompts.jsonl"), "max_prompt_len": 16, "max_len": 64},
            "reward": {"verifier": "arithmetic"},
            "generation": {"max_new_tokens": a.new_tokens, "min_new_tokens": a.new_tokens, "top_k": 0,
                           "batch_size": a.gen_batch},
            "ppo": {"iterations": a.iterations, "batch_size": a.batch_size, "minibatches": 2,
                    "epochs": a.epochs, "kl_coef": 0.05},
            "logging": {"tensorboard": False, "progress": False}}


def plan_steps(base: dict, modes: dict) -> dict[str, float]:
    """`meshrl plan`'s step for each mode's config on 2 CPU ranks."""
    from meshrl.engine.runtime.config import load_run_config
    from meshrl.planning.plan import plan_config
    base = {**base, "cluster": {"nodes": 1, "gpus_per_node": 2, "device": "cpu"}}
    return {n: plan_config(load_run_config(None, [], base={**base, "async": {"max_staleness": int(n)}}),
                           world=2).step_seconds for n in modes}


def steady_state(run_dir: str, skip: int) -> dict:
    """Mean step time and busy fractions over the steps after the first ``skip``."""
    from meshrl.engine.runtime.metrics import read_metrics
    rows = [r for r in read_metrics(run_dir) if r["phase"] == "train"][skip:]
    sync = not any("time/wait/actor_gen" in r for r in rows)
    if not sync:  # the last max_staleness steps sample nothing (no batch is left to sample)
        rows = [r for r in rows if r.get("time/actor_gen", 0.0) > 0]
    if not rows:
        raise SystemExit(f"{run_dir}: no steady steps to average: raise --iterations above --skip + "
                         "the largest max_staleness")
    mean = lambda k: sum(r.get(k, 0.0) for r in rows) / len(rows)  # noqa: E731
    step, gen, wait = mean("step_seconds"), mean("time/actor_gen"), mean("time/wait/actor_gen")
    return {"step_s": step, "gen_s": gen, "steps": len(rows),
            "gen_busy": gen / step,
            # synchronous: the training ranks idle while generation runs; async: while they wait
            "train_busy": 1.0 - (gen if sync else wait) / step,
            "staleness_mean": mean("async/staleness_mean") if not sync else 0.0}


def worker(cfg_path: str, out_path: str, modes: list[int], repeats: int, skip: int):
    """Under torchrun: every mode in turn, ``repeats`` passes; rank 0 writes the summaries."""
    from meshrl.engine.runtime.config import load_run_config
    from meshrl.engine.runtime.run import run_config
    with open(cfg_path) as f:
        base = json.load(f)
    d = os.path.dirname(cfg_path)
    out = {str(n): [] for n in modes}
    for rep in range(repeats):
        for n in modes:
            run_dir = os.path.join(d, f"n{n}_r{rep}")
            cfg = dict(base, run_dir=run_dir, **{"async": {"max_staleness": n}})
            run_config(load_run_config(None, [], base=cfg))
            if int(os.environ.get("RANK", "0")) == 0:
                out[str(n)].append(steady_state(run_dir, skip))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_path, "w") as f:
            json.dump(out, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out (start-up, the first batch)")
    ap.add_argument("--modes", default="0,1", help="async.max_staleness values (0: synchronous)")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the modes; each keeps its fastest")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--gen-batch", type=int, default=8, help="prompts per decoding batch")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG_JSON", "OUT_JSON"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    modes = [int(x) for x in a.modes.split(",")]
    if a.worker:
        return worker(*a.worker, modes, a.repeats, a.skip)
    d = tempfile.mkdtemp(prefix="meshrl-async-")
    cfg_path, out_path = os.path.join(d, "cfg.json"), os.path.join(d, "out.json")
    with open(cfg_path, "w") as f:
        json.dump(base := base_config(d, a), f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           os.path.abspath(__file__), "--worker", cfg_path, out_path, "--modes", a.modes,
           "--repeats", str(a.repeats), "--skip", str(a.skip)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MESHRL_DEVICE": "cpu"})
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    with open(out_path) as f:
        runs = json.load(f)
    best = {n: min(rs, key=lambda r: r["step_s"]) for n, rs in runs.items()}
    planned = plan_steps(base, best)
    sync = best.get("0")
    print(f"PPO, demo-size model, batch {a.batch_size} (decoded {a.gen_batch} at a time), "
          f"{a.new_tokens} new tokens, epochs {a.epochs}; "
          f"generation on rank 0, the rest on rank 1 (gloo, CPU); mean over steps {a.skip}.."
          f"{a.iterations - 1} (async: those that sampled a batch), best of {a.repeats}")
    print(f"{'mode':<22}{'step s':>9}{'gen s':>9}{'speed-up':>10}{'gen busy':>10}{'train busy':>12}"
          f"{'plan s':>9}{'plan speed-up':>15}")
    for n, r in best.items():
        name = "synchronous" if n == "0" else f"async max_staleness={n}"
        ratio = f"{sync['step_s'] / r['step_s']:.2f}x" if sync else "-"
        plan_ratio = f"{planned['0'] / planned[n]:.2f}x" if "0" in planned else "-"
        print(f"{name:<22}{r['step_s']:>9.3f}{r['gen_s']:>9.3f}{ratio:>10}{r['gen_busy']:>10.2f}"
              f"{r['train_busy']:>12.2f}{planned[n]:>9.3f}{plan_ratio:>15}")
    print("plan s: `meshrl plan`'s steady-state step for the same config (benchmarks/rates.json's "
          "committed CPU rates, not calibrated now)")
    import torch
    from harness import write_results
    rows = [{"max_staleness": int(n), **r, "plan_step_s": planned[n],
             "speedup": sync["step_s"] / r["step_s"] if sync else None} for n, r in best.items()]
    print(f"wrote {write_results('async_rl', torch.device('cpu'), rows, {'args': vars(a), 'runs': runs})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
