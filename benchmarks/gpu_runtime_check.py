"""The runtime end to end on a GPU: a tiny model from scratch through SFT, PPO, GRPO and iterative DPO
on one device (generation through the fast engine), every metric finite and the PPO reward moving.
Exits non-zero on a failure.

    PYTHONPATH=. python benchmarks/gpu_runtime_check.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshrl.engine.data.jsonl import write_jsonl  # noqa: E402
from meshrl.engine.runtime.config import load_run_config  # noqa: E402
from meshrl.engine.runtime.metrics import read_metrics  # noqa: E402
from meshrl.engine.runtime.run import run_config  # noqa: E402
from meshrl.engine.tasks import make_dataset  # noqa: E402
from meshrl.study.setup import init_scratch_model  # noqa: E402

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def cell(d, model, alg, **extra):
    base = {"algorithm": alg, "seed": 3, "run_dir": os.path.join(d, alg), "save_hf": alg == "sft",
            "models": {"actor": {"path": model, "optim": {"lr": 1e-4}}, "ref": {"path": model},
                       "critic": {"path": model, "optim": {"lr": 1e-3}}},
            "data": {"train": os.path.join(d, "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
            "reward": {"verifier": "arithmetic"}, "generation": {"max_new_tokens": 4, "top_k": 0},
            "logging": {"progress": False, "tensorboard": False}}
    keep = {"sft": ("actor",), "ppo": ("actor", "ref", "critic"), "grpo": ("actor", "ref"),
            "dpo": ("actor", "ref")}[alg]
    base["models"] = {k: v for k, v in base["models"].items() if k in keep}
    base.update(extra)
    t0 = time.perf_counter()
    run_config(load_run_config(None, [], base=base))
    rows = [r for r in read_metrics(base["run_dir"]) if r["phase"] == "train"]
    bad = [(r["step"], k) for r in rows for k, v in r.items()
           if isinstance(v, float) and not math.isfinite(v)]
    print(f"{alg}: {len(rows)} steps in {time.perf_counter() - t0:.1f} s; last: "
          + json.dumps({k: round(v, 4) for k, v in rows[-1].items()
                        if k in ("loss", "score", "kl_seq", "pass_rate", "pairs")}))
    return rows, bad


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    d = args.out or tempfile.mkdtemp()
    recs = make_dataset(400, seed=1, digits=(1, 2))
    write_jsonl(os.path.join(d, "prompts.jsonl"), recs)
    write_jsonl(os.path.join(d, "sft.jsonl"), [{"prompt": r["prompt"], "response": r["answer"]} for r in recs])
    model = init_scratch_model(os.path.join(d, "init"), seed=0, overrides=TINY)
    fails = []
    rows, bad = cell(d, model, "sft", data={"train": os.path.join(d, "sft.jsonl"), "max_len": 24},
                     sft={"batch_size": 64, "steps": 150})
    fails += bad
    sft = os.path.join(d, "sft", "hf", "actor")
    rows, bad = cell(d, sft, "ppo", ppo={"iterations": 8, "batch_size": 64, "minibatches": 2,
                                         "kl_coef": 0.01})
    fails += bad
    rows, bad = cell(d, sft, "grpo", grpo={"iterations": 4, "batch_size": 16, "group_size": 4,
                                           "minibatches": 2})
    fails += bad
    rows, bad = cell(d, sft, "dpo", dpo={"rounds": 2, "prompts_per_round": 64, "batch_size": 16})
    fails += bad
    print("FAILED: non-finite " + str(fails) if fails else "runtime GPU check passed")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
