"""`make study`: SFT / DPO / DPO+SFT / DPO-Iter / PPO and the critic-free family (GRPO, Dr.GRPO,
DAPO, RLOO, REINFORCE++) on the arithmetic task, and the paper's PPO factor ablation (Table 3:
baseline batch 64 → + advantage normalisation → + large batch 512 → + EMA reference), over five
seeds: the held-out pass rate and each method's change against its own seed's SFT model, mean ± std
over seeds. Every seed's SFT model stops at the same held-out pass rate, so that each starts the
methods with the same room to improve. Each cell is cached under the output directory; an
interrupted study resumes at the cell it was running."""
from __future__ import annotations

import argparse
import json
import os
import statistics as st

from .pipeline import (critic_free_cell, dpo_cell, format_table, ppo_cell, prepare, run_cell,
                       samples_drawn, sft_cell)

SEEDS = (1, 2, 3, 4, 5)
SFT_STEPS, SFT_TARGET = 2000, 0.5  # the most SFT steps; stop at this held-out pass rate
PPO_ITERATIONS = 60
ABLATION = [  # cumulative, as in the paper's Table 3
    ("baseline PPO (batch 64)", dict(batch=64, adv_norm=False, ema_ref=False)),
    ("+ advantage normalisation", dict(batch=64, adv_norm=True, ema_ref=False)),
    ("+ large batch (512)", dict(batch=512, adv_norm=True, ema_ref=False)),
    ("+ EMA reference", dict(batch=512, adv_norm=True, ema_ref=True)),
]
# The critic-free family on PPO's budget: 60 iterations × 512 responses (64 prompts × 8 samples;
# REINFORCE++ 512 prompts × 1), KL coefficients as PPO's 0.05 where the method keeps a KL term.
CRITIC_FREE = [
    ("GRPO", dict(prompts=64, group_size=8, advantage="grpo", kl_coef=0.04)),
    ("Dr.GRPO", dict(prompts=64, group_size=8, advantage="dr_grpo", kl_coef=0.0,
                     loss_agg="seq-mean-token-sum-norm")),
    ("DAPO", dict(prompts=64, group_size=8, advantage="grpo", kl_coef=0.0, clip_eps_low=0.2,
                  clip_eps_high=0.28, dynamic_sampling=True, max_sampling_rounds=3,
                  overlong_buffer=2)),
    ("RLOO", dict(prompts=64, group_size=8, advantage="rloo", kl_in="reward", kl_estimator="k1",
                  kl_coef=0.05)),
    ("REINFORCE++", dict(prompts=512, group_size=1, advantage="reinforce_pp", kl_in="reward",
                         kl_estimator="k1", kl_coef=0.05)),
]
PPO = ABLATION[-1][0]


def cells_for_seed(out_dir: str, seed: int) -> dict[str, dict]:
    data, init = prepare(out_dir, seed=0)
    root = os.path.join(out_dir, f"seed{seed}")
    res = {"SFT": run_cell(root, "sft", sft_cell(data, init, steps=SFT_STEPS, seed=seed,
                                                 stop_at=SFT_TARGET))}
    sft_model = os.path.join(root, "sft", "hf", "actor")
    res["DPO"] = run_cell(root, "dpo", dpo_cell(data, sft_model, seed=seed, rounds=1,
                                                prompts_per_round=1024))
    res["DPO+SFT"] = run_cell(root, "dpo_sft", dpo_cell(data, sft_model, seed=seed, rounds=1,
                                                        prompts_per_round=1024, sft_coef=1.0))
    res["DPO-Iter"] = run_cell(root, "dpo_iter", dpo_cell(data, sft_model, seed=seed, rounds=4))
    for i, (name, kw) in enumerate(ABLATION):
        res[name] = _counted(root, f"ppo_{i}", ppo_cell(data, sft_model, seed=seed,
                                                         iterations=PPO_ITERATIONS, **kw))
    for name, kw in CRITIC_FREE:
        cell = name.lower().replace(".", "").replace("+", "p")
        res[name] = _counted(root, cell, critic_free_cell(data, sft_model, seed=seed,
                                                           iterations=PPO_ITERATIONS, **kw))
    return res


def _counted(root: str, name: str, cell: dict) -> dict:
    return {**run_cell(root, name, cell), "samples": samples_drawn(os.path.join(root, name))}


def significance(gains: list[float]) -> str:
    """'yes' when the mean change is larger than twice its spread over seeds (population std),
    the bar for a difference that the seeds do not drown."""
    return "yes" if len(gains) > 1 and abs(st.mean(gains)) > 2 * st.pstdev(gains) else "no"


def report(per_seed: dict, seeds) -> str:
    names = list(per_seed[seeds[0]])
    rows = {n: ([per_seed[s][n]["pass_rate"] for s in seeds], [per_seed[s][n]["seconds"] for s in seeds])
            for n in names}
    sft = dict(zip(seeds, rows["SFT"][0]))
    gains = {n: [per_seed[s][n]["pass_rate"] - sft[s] for s in seeds] for n in names}
    samples = {n: st.mean(per_seed[s][n]["samples"] for s in seeds) for n in names
               if "samples" in per_seed[seeds[0]][n]}
    extra = {"> 2σ": {n: significance(gains[n]) for n in names if n != "SFT"},
             "samples": {n: f"{samples[n]:,.0f}" for n in samples}}
    main = ["SFT", "DPO", "DPO+SFT", "DPO-Iter", "PPO"] + [n for n, _ in CRITIC_FREE]
    alias = {"PPO": PPO}
    table = [(n, *rows[alias.get(n, n)]) for n in main]
    main_gains = {n: gains[alias.get(n, n)] for n in main}
    main_extra = {k: {n: v[alias.get(n, n)] for n in main if alias.get(n, n) in v} for k, v in extra.items()}
    vs_ppo = {n: [per_seed[s][n]["pass_rate"] - per_seed[s][PPO]["pass_rate"] for s in seeds]
              for n in names if n != PPO}
    lines = [f"{n}: {st.mean(v):+.3f} ± {st.pstdev(v):.3f} ({significance(v)})"
             for n, v in vs_ppo.items() if n in main]
    return ("Methods (PPO = all three factors: batch 512, advantage normalisation, EMA reference)\n\n"
            + format_table(table, gains=main_gains, extra=main_extra)
            + "\n\nPPO factor ablation (cumulative)\n\n"
            + format_table([(n, *rows[n]) for n, _ in ABLATION], gains=gains, extra=extra)
            + "\n\nEach method against PPO, same seed (mean ± std; > 2σ?):\n" + "\n".join(lines)
            + "\n\nper seed: " + json.dumps({n: [round(v, 3) for v in rows[n][0]] for n in names})
            + "\n")


def run_study(out_dir: str = "runs/study", seeds=SEEDS) -> str:
    per_seed = {s: cells_for_seed(out_dir, s) for s in seeds}
    text = report(per_seed, seeds)
    with open(os.path.join(out_dir, "study.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "study.json"), "w") as f:
        json.dump({str(s): v for s, v in per_seed.items()}, f, indent=1)
    return text


def add_arguments(p):
    p.add_argument("--out", default="runs/study")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))


def run(args) -> int:
    print(run_study(args.out, tuple(args.seeds)))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
