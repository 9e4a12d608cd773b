"""`make demo`: a tiny model trained from scratch on the bundled arithmetic task (SFT), then
SFT → PPO, SFT → DPO and SFT → DPO with an SFT term, with a table of held-out pass rates and plots.
About 3–4 minutes on 2 CPU cores; every stage is cached under the output directory, so a rerun is
instant (delete the directory to train again)."""
from __future__ import annotations

import argparse
import os

from meshrl.engine.runtime.plot import compare_runs, plot_run

from .pipeline import dpo_cell, format_table, ppo_cell, prepare, run_cell, sft_cell


def run_demo(out_dir: str = "runs/demo", *, seed: int = 1, sft_steps: int = 900,
             ppo_iterations: int = 120, dpo_rounds: int = 4) -> str:
    data, init = prepare(out_dir, seed=0)
    sft = run_cell(out_dir, "sft", sft_cell(data, init, steps=sft_steps, seed=seed))
    sft_model = os.path.join(out_dir, "sft", "hf", "actor")
    ppo = run_cell(out_dir, "ppo", ppo_cell(data, sft_model, seed=seed, iterations=ppo_iterations,
                                            batch=128))
    dpo_kw = dict(seed=seed, rounds=dpo_rounds, lr=3e-5, prompts_per_round=512)
    dpo = run_cell(out_dir, "dpo", dpo_cell(data, sft_model, **dpo_kw))
    dpo_sft = run_cell(out_dir, "dpo_sft", dpo_cell(data, sft_model, sft_coef=1.0, **dpo_kw))
    table = format_table([
        ("SFT (from scratch)", [sft["pass_rate"]], [sft["seconds"]]),
        ("SFT → PPO", [ppo["pass_rate"]], [ppo["seconds"]]),
        (f"SFT → DPO ({dpo_rounds} rounds of verifier-labelled pairs)", [dpo["pass_rate"]],
         [dpo["seconds"]]),
        ("SFT → DPO + SFT term (same pairs)", [dpo_sft["pass_rate"]], [dpo_sft["seconds"]])])
    plots = []
    for name in ("sft", "ppo", "dpo", "dpo_sft"):
        plots += plot_run(os.path.join(out_dir, name), strict=False)
    plots.append(compare_runs([os.path.join(out_dir, n) for n in ("ppo", "dpo")],
                              os.path.join(out_dir, "compare_score.png"), "score"))
    report = f"{table}\n\nplots: {', '.join(plots)}\n"
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(report)
    return report


def add_arguments(p):
    p.add_argument("--out", default="runs/demo", help="output directory (cached stages are reused)")
    p.add_argument("--seed", type=int, default=1)


def run(args) -> int:
    print(run_demo(args.out, seed=args.seed))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
