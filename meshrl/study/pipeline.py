"""The paper's experiments in miniature: cells (SFT, DPO, DPO+SFT, DPO-Iter, PPO and its factor
ablations) trained on the bundled arithmetic task, each cached under the output directory, so a
rerun resumes where it stopped and skips finished cells."""
from __future__ import annotations

import json
import os
import time

from meshrl.engine.runtime.config import load_run_config
from meshrl.engine.runtime.run import run_config

from .setup import init_scratch_model, write_task_data

DATA = dict(n_train=4000, n_eval=200, seed=0, digits=(1, 2))
GEN = {"max_new_tokens": 6, "batch_size": 256, "top_k": 0, "temperature": 1.0}
COMMON = {"data": {"max_len": 32, "max_prompt_len": 16, "eval_samples": 200},
          "reward": {"verifier": "arithmetic"}, "generation": GEN,
          "logging": {"progress": True, "eval_every": 0}}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_cell(out_dir: str, name: str, base: dict) -> dict:
    """Run one cell unless its result file exists; return {"pass_rate", "seconds", ...}."""
    run_dir = os.path.join(out_dir, name)
    done = os.path.join(run_dir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    t0 = time.perf_counter()
    final = run_config(load_run_config(None, [], base=_merge(COMMON, {**base, "run_dir": run_dir})))
    result = {**{k: float(v) for k, v in final.items()}, "seconds": time.perf_counter() - t0}
    with open(done, "w") as f:
        json.dump(result, f)
    return result


def prepare(out_dir: str, seed: int = 0) -> tuple[dict, str]:
    data = write_task_data(os.path.join(out_dir, "data"), **DATA)
    model = init_scratch_model(os.path.join(out_dir, "init"), seed=seed)
    return data, model


def sft_cell(data, model, *, steps: int, seed: int, stop_at: float | None = None) -> dict:
    """SFT from scratch; with ``stop_at``, it stops at the first held-out evaluation (every 25
    steps) whose pass rate reaches it, so that every seed's SFT model starts the methods from a
    comparable point with room to improve."""
    cell = {"algorithm": "sft", "seed": seed,
            "models": {"actor": {"path": model, "optim": {"lr": 2e-3, "warmup_steps": 20,
                                                          "schedule": "cosine", "weight_decay": 0.01}}},
            "data": {"train": data["sft"], "eval": data["eval"]},
            "sft": {"batch_size": 64, "steps": steps}}
    if stop_at is not None:
        cell["logging"] = {"eval_every": 25, "stop_at_pass_rate": stop_at}
    return cell


def ppo_cell(data, sft_model, *, seed: int, iterations: int, batch: int, adv_norm=True,
             ema_ref=False, lr=3e-5, epochs=2) -> dict:
    actor = {"path": sft_model, "optim": {"lr": lr}}
    return {"algorithm": "ppo", "seed": seed,
            "models": {"actor": actor, "critic": {"path": sft_model, "optim": {"lr": 1e-4}},
                       "ref": {"path": sft_model}},
            "data": {"train": data["prompts"], "eval": data["eval"]},
            "ppo": {"iterations": iterations, "batch_size": batch, "minibatches": max(1, batch // 64),
                    "epochs": epochs, "kl_coef": 0.05, "adv_norm": adv_norm, "ema_ref": ema_ref,
                    "ema_alpha": 0.99}}


def critic_free_cell(data, sft_model, *, seed: int, iterations: int, prompts: int, group_size: int,
                     lr=3e-5, epochs=2, **grpo) -> dict:
    """The critic-free family (``algorithm: grpo``) on the same sample budget as a PPO cell of
    ``prompts × group_size`` prompts; minibatches of 64 responses, as PPO's."""
    models = {"actor": {"path": sft_model, "optim": {"lr": lr}}}
    if grpo.get("kl_coef", 0.04) > 0:
        models["ref"] = {"path": sft_model}
    return {"algorithm": "grpo", "seed": seed, "models": models,
            "data": {"train": data["prompts"], "eval": data["eval"]},
            "grpo": {"iterations": iterations, "batch_size": prompts, "group_size": group_size,
                     "minibatches": max(1, prompts * group_size // 64), "epochs": epochs, **grpo}}


def samples_drawn(run_dir: str) -> int:
    """Responses a PPO or critic-free cell generated for training (dynamic sampling's extra draws
    included; held-out evaluation not)."""
    from meshrl.engine.runtime.config import load_run_config as load
    from meshrl.engine.runtime.metrics import read_metrics
    cfg = load(os.path.join(run_dir, "config.yaml"))
    rows = [r for r in read_metrics(run_dir) if r["phase"] == "train"]
    if cfg.algorithm == "ppo":
        return cfg.ppo.batch_size * len(rows)
    k = cfg.grpo.group_size
    return int(sum(r.get("sampling/prompts_drawn", cfg.grpo.batch_size) * k for r in rows))


def dpo_cell(data, sft_model, *, seed: int, rounds: int, sft_coef=0.0, lr=2e-5,
             prompts_per_round=256) -> dict:
    """Online pairs from the SFT model, best vs worst of 4 samples by the verifier: one round is
    DPO on a fixed self-generated preference set; several rounds are iterative DPO."""
    return {"algorithm": "dpo", "seed": seed,
            "models": {"actor": {"path": sft_model, "optim": {"lr": lr}}, "ref": {"path": sft_model}},
            "data": {"train": data["prompts"], "eval": data["eval"]},
            "dpo": {"rounds": rounds, "samples_per_prompt": 4, "prompts_per_round": prompts_per_round,
                    "batch_size": 32, "epochs": 2, "beta": 0.1, "sft_coef": sft_coef}}


def format_table(rows: list[tuple[str, list[float], list[float]]], gains: dict | None = None,
                 extra: dict[str, dict[str, str]] | None = None) -> str:
    """rows: (name, pass rates over seeds, seconds) -> a markdown table, mean ± std over seeds when
    there are several; ``gains`` adds each method's per-seed change against that seed's SFT model;
    ``extra`` adds columns {header: {method: text}} ("—" where a method has none). Minutes: the
    median over seeds (a cell run while the machine was busy does not skew it)."""
    import statistics as st
    many = any(len(v) > 1 for _, v, _ in rows)
    extra = extra or {}
    head = ["method", "held-out pass rate"] + (["Δ vs SFT (same seed)"] if gains else [])
    head += list(extra) + (["seeds"] if many else [])
    lines = ["| " + " | ".join(head + ["minutes" + (" per seed" if many else "")]) + " |",
             "|" + "---|" * (len(head) + 1)]
    fmt = (lambda v: f"{st.mean(v):.3f} ± {st.pstdev(v):.3f}") if many else (lambda v: f"{v[0]:.3f}")
    for name, vals, secs in rows:
        cells = [name, fmt(vals)] + ([fmt(gains[name])] if gains else [])
        cells += [col.get(name, "—") for col in extra.values()]
        cells += [str(len(vals))] if many else []
        lines.append("| " + " | ".join(cells + [f"{st.median(secs) / 60:.1f}"]) + " |")
    return "\n".join(lines)
