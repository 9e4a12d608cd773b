"""The loop driver and the pieces every algorithm loop shares: data order, global means, evaluation."""
from __future__ import annotations

import time

import torch

from meshrl.engine.data.datasets import load_prompts
from meshrl.engine.data.jsonl import DataError

from .asynchronous import busy_fractions
from .config import RunConfigError
from .metrics import RESERVED_KEYS, read_metrics
from .rollout import sample, sampling_params, score


def loaded(ctx, examples):
    """A loader's examples, after saying what it dropped (too long under data.too_long=skip,
    identical pairs, safety filters); none left is an error naming the reasons."""
    report = examples.report
    if not examples:
        raise DataError(f"{report.summary()}: no records left to use")
    if report.dropped and ctx.main:
        print(f"data: {report.summary()}")
    return examples


def load_prompt_file(ctx, path):
    """Prompts of a JSONL file in the verifier's terms: its prompt field (``question`` for code
    tasks), and every record checked by it now, with file and line, rather than mid-run."""
    d, verifier = ctx.cfg.data, ctx.verifier
    prompts = loaded(ctx, load_prompts(path, ctx.tokenizer, max_prompt_len=d.max_prompt_len,
                                       chat_template=d.chat_template, too_long=d.too_long,
                                       prompt_field=getattr(verifier, "prompt_field", "prompt")))
    check = getattr(verifier, "check_record", None)
    for p in prompts if check else ():
        try:
            check(p.record)
        except (ValueError, KeyError) as e:
            raise DataError(f"{path}:{p.lineno}: {e}") from None
    return prompts


def train_prompts(ctx):
    """The run's training prompts (PPO, GRPO, iterative DPO)."""
    return training_data(ctx, load_prompt_file(ctx, ctx.cfg.data.train))


def training_data(ctx, examples):
    """The run's training examples, their count kept in the checkpoint. Data order is a pure
    function of (seed, step, count) (``global_batch``), so a resumed run sees the uninterrupted
    run's batches exactly when the file still holds as many usable records: refuse otherwise."""
    saved, n = ctx.host_state.get("data"), len(examples)
    if saved is not None and saved["records"] != n:
        raise RunConfigError(f"data.train: {ctx.cfg.data.train} now gives {n} records, but the run "
                             f"in {ctx.cfg.run_dir} was trained on {saved['records']} (from "
                             f"{saved['train']}), so a resumed run would see other batches: restore "
                             "the file, or give a new run_dir")
    ctx.host_state["data"] = {"train": ctx.cfg.data.train, "records": n}
    return examples


def held_out(ctx, kind: str, load):
    """The run's held-out data of one kind (``load(path)``), loaded once and cut to
    ``data.eval_samples``; ``run_loop`` asks for it before the first step, so a bad eval file
    stops a run before it trains, not after."""
    if kind not in ctx.held_out:
        ctx.held_out[kind] = load(ctx.cfg.data.eval)[:ctx.cfg.data.eval_samples]
    return ctx.held_out[kind]


def held_out_metric(ctx) -> str | None:
    """What greedy samples on held-out prompts are scored as: the verifier's pass rate, or under
    PPO and GRPO the reward model's mean score; None when neither applies."""
    if ctx.verifier:
        return "pass_rate"
    if ctx.cfg.algorithm in ("ppo", "grpo") and ctx.cfg.reward.model:
        return "score"
    return None


def held_out_prompts(ctx):
    """The prompts ``evaluate_pass_rate`` decodes (None when it does not run)."""
    if held_out_metric(ctx):
        return held_out(ctx, "prompts", lambda path: load_prompt_file(ctx, path))
    return None


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of step ``step``'s global batch: consecutive slices of per-epoch shuffles, so a
    resumed run sees exactly the data the uninterrupted one would have."""
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} examples in the training data")
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    return epoch_order(n, seed, epoch)[k * batch_size:(k + 1) * batch_size]


def step_count(n: int, batch_size: int, epochs: int, steps: int | None) -> int:
    """Steps of a run over a fixed dataset: ``steps`` when given, else whole batches × epochs."""
    return steps if steps is not None else max(1, epochs * (n // batch_size))


def data_lengths(items) -> dict:
    """Mean prompt and response tokens per trained sequence of a batch of SFT examples or pairs
    (a pair is two sequences), logged with each step (``meshrl bench`` prices the plan with them)."""
    prompt = response = seqs = 0
    for it in items:
        responses = ([it.response_ids] if hasattr(it, "response_ids")
                     else [it.chosen_ids, it.rejected_ids])
        prompt += len(it.prompt_ids) * len(responses)
        response += sum(len(r) for r in responses)
        seqs += len(responses)
    return {"data/prompt_len": prompt / max(seqs, 1), "data/response_len": response / max(seqs, 1)}


def evaluate_pass_rate(ctx, call: str, step: int) -> dict:
    """Greedy decoding on held-out prompts scored by the verifier (the held-out pass rate) or, in
    PPO and GRPO without one, by the reward model (the held-out mean score)."""
    cfg, metric = ctx.cfg, held_out_metric(ctx)
    if not (cfg.data.eval and metric):
        return {}
    params = sampling_params(cfg.generation, ctx.eos_ids, cfg.seed, 0, greedy=True)
    roll = sample(ctx, call, held_out_prompts(ctx), params)
    out = {metric: score(ctx, call, roll).mean().item()}
    ctx.end_step(None)  # evaluation is not part of the step being timed
    ctx.services.log(step, out, phase="eval")
    return out


def final_evaluation(run_dir: str, step: int) -> dict:
    """The evaluation a finished run logged at its last step (what ``run_loop`` returned then)."""
    try:
        records = read_metrics(run_dir)
    except FileNotFoundError:
        return {}
    out = {}
    for r in records:
        if r.get("phase") == "eval" and r["step"] == step:
            out.update({k: v for k, v in r.items() if k not in RESERVED_KEYS and v is not None})
    return out


def run_loop(ctx, total: int, step_fn, *, desc: str, limit_key: str, eval_fn=None, eval_data=None,
             show=("loss",), updates_per_step: int = 1):
    """Steps ``ctx.start_step .. total-1``: log, checkpoint and evaluate on schedule; a progress
    bar on the main rank. ``step_fn(step) -> metrics``. Learning-rate schedules without an explicit
    length span the whole run (``total × updates_per_step`` optimizer steps). ``limit_key`` names
    the config key that sets ``total``, for the error a resumed run past it gets. ``eval_data()``
    loads the held-out data ``eval_fn`` uses, before the first step. A checkpoint (and at the end
    the HF export) is written before the evaluation beside it, so a failing evaluation loses no
    training."""
    if ctx.start_step > total:  # saving at `total` would overwrite that checkpoint with later weights
        raise RunConfigError(f"{limit_key}: this run stops after {total} steps but {ctx.cfg.run_dir} "
                             f"holds a checkpoint at step {ctx.start_step}: raise it to continue, or "
                             "give a new run_dir")
    stopped = ctx.host_state.get("stopped_at")  # logging.stop_at_pass_rate ended it there
    if (ctx.start_step == total and total > 0) or (stopped is not None and stopped == ctx.start_step):
        if ctx.main:  # a finished run started again: nothing to redo
            print(f"{desc}: {ctx.cfg.run_dir} is complete at step {ctx.start_step}; nothing to run")
        return final_evaluation(ctx.cfg.run_dir, ctx.start_step)
    if eval_fn and eval_data and ctx.cfg.data.eval:
        eval_data()
    for m in ctx.executor.trained_models().values():
        if m.trainer is not None and m.trainer.cfg.total_steps is None:
            m.trainer.cfg.total_steps = total * updates_per_step
    with ctx.watchdog.inside(f"the {desc} loop"):
        return _loop(ctx, total, step_fn, desc=desc, eval_fn=eval_fn, show=show)


def _loop(ctx, total, step_fn, *, desc, eval_fn, show):
    """``run_loop``'s steps, from the resumed step to the end."""
    cfg = ctx.cfg.logging
    bar = ctx.services.progress(total, desc, initial=ctx.start_step)
    last = {}
    stop_at, end = cfg.stop_at_pass_rate, total
    for step in range(ctx.start_step, total):
        ctx.watchdog.mark(step)
        t0 = time.perf_counter()
        metrics = step_fn(step)
        metrics["step_seconds"] = time.perf_counter() - t0
        metrics.update(ctx.end_step(step))
        metrics.update(busy_fractions(metrics))
        ctx.services.log(step, metrics)
        done = step + 1
        if cfg.save_every and done % cfg.save_every == 0 and done < total:
            ctx.save(done)
        if eval_fn and cfg.eval_every and done % cfg.eval_every == 0 and done < total:
            with ctx.watchdog.inside("evaluation"):
                last.update(eval_fn(done))
            if stop_at is not None and last.get("pass_rate", -1.0) >= stop_at:
                end = done
                ctx.host_state["stopped_at"] = done
                if ctx.main:
                    print(f"{desc}: held-out pass rate {last['pass_rate']:.3f} >= "
                          f"logging.stop_at_pass_rate={stop_at} at step {done}: stopping")
                break
        bar.update(1)
        bar.set_postfix({k: f"{metrics[k]:.3g}" for k in show if k in metrics}, refresh=False)
    bar.close()
    ctx.save(end)
    if ctx.cfg.save_hf:
        ctx.save_hf_models()
    if eval_fn and end == total:  # a run stopped early was just evaluated at its last step
        with ctx.watchdog.inside("evaluation"):
            last.update(eval_fn(total))
    return last
