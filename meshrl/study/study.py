"""`make study`: SFT / DPO / DPO+SFT / DPO-Iter / PPO on the arithmetic task, and the paper's PPO
factor ablation (Table 3: baseline batch 64 → + advantage normalisation → + large batch 512 →
+ EMA reference), over several seeds, mean ± std of the held-out pass rate. Each cell is cached
under the output directory; an interrupted study resumes at the cell it was running."""
from __future__ import annotations

import argparse
import json
import os

from .pipeline import dpo_cell, format_table, ppo_cell, prepare, run_cell, sft_cell

PPO_ITERATIONS = 60
ABLATION = [  # cumulative, as in the paper's Table 3
    ("baseline PPO (batch 64)", dict(batch=64, adv_norm=False, ema_ref=False)),
    ("+ advantage normalisation", dict(batch=64, adv_norm=True, ema_ref=False)),
    ("+ large batch (512)", dict(batch=512, adv_norm=True, ema_ref=False)),
    ("+ EMA reference", dict(batch=512, adv_norm=True, ema_ref=True)),
]


def cells_for_seed(out_dir: str, seed: int) -> dict[str, dict]:
    data, init = prepare(out_dir, seed=0)
    root = os.path.join(out_dir, f"seed{seed}")
    res = {"SFT": run_cell(root, "sft", sft_cell(data, init, steps=900, seed=seed))}
    sft_model = os.path.join(root, "sft", "hf", "actor")
    res["DPO"] = run_cell(root, "dpo", dpo_cell(data, sft_model, seed=seed, rounds=1,
                                                prompts_per_round=1024))
    res["DPO+SFT"] = run_cell(root, "dpo_sft", dpo_cell(data, sft_model, seed=seed, rounds=1,
                                                        prompts_per_round=1024, sft_coef=1.0))
    res["DPO-Iter"] = run_cell(root, "dpo_iter", dpo_cell(data, sft_model, seed=seed, rounds=4))
    for i, (name, kw) in enumerate(ABLATION):
        res[name] = run_cell(root, f"ppo_{i}", ppo_cell(data, sft_model, seed=seed,
                                                         iterations=PPO_ITERATIONS, **kw))
    return res


def run_study(out_dir: str = "runs/study", seeds=(1, 2, 3)) -> str:
    per_seed = {s: cells_for_seed(out_dir, s) for s in seeds}
    names = list(per_seed[seeds[0]])
    rows = [(n, [per_seed[s][n]["pass_rate"] for s in seeds], [per_seed[s][n]["seconds"] for s in seeds])
            for n in names]
    sft = dict(zip(seeds, rows[0][1]))
    gains = {n: [per_seed[s][n]["pass_rate"] - sft[s] for s in seeds] for n in names}
    main = [r for r in rows if not r[0].startswith(("baseline", "+"))]
    ablation = [r for r in rows if r[0].startswith(("baseline", "+"))]
    report = ("Methods (PPO = all three factors: batch 512, advantage normalisation, EMA reference)\n\n"
              + format_table(main + [("PPO", *ablation[-1][1:])], gains={**gains, "PPO": gains[ablation[-1][0]]})
              + "\n\nPPO factor ablation (cumulative)\n\n" + format_table(ablation, gains=gains) + "\n"
              + "\nper seed: " + json.dumps({n: [round(v, 3) for v in r[1]] for n, r in zip(names, rows)})
              + "\n")
    with open(os.path.join(out_dir, "study.md"), "w") as f:
        f.write(report)
    with open(os.path.join(out_dir, "study.json"), "w") as f:
        json.dump({str(s): v for s, v in per_seed.items()}, f, indent=1)
    return report


def add_arguments(p):
    p.add_argument("--out", default="runs/study")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])


def run(args) -> int:
    print(run_study(args.out, tuple(args.seeds)))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
