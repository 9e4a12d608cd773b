"""Calls of one model in different layouts: the actor generates in one layout and trains in another
(overlapping and disjoint meshes), with the weights reallocated between them, and the run matches
the shared-layout run for the same seed."""
import json
import os

import pytest

from meshrl.engine.data.jsonl import read_jsonl, write_jsonl
from meshrl.engine.runtime.config import load_run_config
from meshrl.engine.runtime.metrics import read_metrics
from meshrl.engine.runtime.run import run_config
from meshrl.engine.tasks import make_dataset
from meshrl.study.setup import init_scratch_model

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
METRICS = ("score", "kl_seq", "response_len", "reward_total", "advantage_raw", "value",
           "actor/actor_loss", "critic/critic_loss", "actor/grad_norm")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("layouts")
    model = init_scratch_model(str(d / "init"), seed=8, overrides=TINY)
    write_jsonl(d / "prompts.jsonl", make_dataset(200, seed=9, digits=(1, 2)))
    return d, model


def _config(d, model, name, calls):
    return {"algorithm": "ppo", "seed": 11, "run_dir": str(d / name), "save_hf": False,
            "models": {"actor": {"path": model, "optim": {"lr": 1e-3}},
                       "critic": {"path": model, "optim": {"lr": 1e-3}}, "ref": {"path": model}},
            "calls": calls,
            "data": {"train": str(d / "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
            "reward": {"verifier": "tests.engine.runtime.toy_rewards:sevens"},
            "generation": {"max_new_tokens": 4, "top_k": 0},
            "ppo": {"iterations": 2, "batch_size": 16, "minibatches": 2, "ema_ref": True,
                    "ema_alpha": 0.9},
            "logging": {"progress": False, "tensorboard": False, "dump_rollouts": 16}}


def _run(cfg):
    run_config(load_run_config(None, [], base=cfg))
    return None


def _run_counting_fast_calls(cfg):
    from meshrl.engine.generation.fast import FastGenerator
    orig, count = FastGenerator.generate, [0]

    def counted(self, *args, **kwargs):
        count[0] += 1
        return orig(self, *args, **kwargs)
    FastGenerator.generate = counted
    try:
        _run(cfg)
    finally:
        FastGenerator.generate = orig
    return count[0]


def _calls(gen, train, others):
    out = {"actor_gen": {"model": "actor", **gen}, "actor_train": {"model": "actor", **train}}
    for call, model in (("ref_inf", "ref"), ("critic_inf", "critic"), ("critic_train", "critic")):
        out[call] = {"model": model, **others}
    return out


def _compare(d, a, b):
    for step in (0, 1):
        ra = [r["output_ids"] for _, r in read_jsonl(d / a / "rollouts" / f"step_{step}.jsonl")]
        rb = [r["output_ids"] for _, r in read_jsonl(d / b / "rollouts" / f"step_{step}.jsonl")]
        assert ra == rb, f"tokens differ at iteration {step}"
    rows = [r for _, r in read_jsonl(d / a / "rollouts" / "step_0.jsonl")]
    assert all(r["prompt"] and isinstance(r["prompt"], str) and r["prompt_ids"] for r in rows)
    ma = [r for r in read_metrics(d / a) if r["phase"] == "train"]
    mb = [r for r in read_metrics(d / b) if r["phase"] == "train"]
    assert len(ma) == len(mb) == 2
    for x, y in zip(ma, mb):
        for k in METRICS:  # fp32; only summation orders differ between layouts
            assert abs(x[k] - y[k]) <= 1e-5 * max(1.0, abs(x[k])), (k, x[k], y[k])


def test_actor_generates_and_trains_in_different_layouts(dist_pool, setup):
    d, model = setup
    pool = dist_pool(4)
    shared = _calls({"tp": 2, "pp": 1}, {"tp": 2, "pp": 1}, {"tp": 2, "pp": 1})
    pool.run(_run, _config(d, model, "shared", shared))
    # train tp2·pp2 on all 4 ranks, generate tp1·dp4: overlapping meshes, tp 2→1, pp 2→1
    split = _calls({"tp": 1, "pp": 1}, {"tp": 2, "pp": 2}, {"tp": 2, "pp": 1})
    pool.run(_run, _config(d, model, "split", split))
    _compare(d, "shared", "split")
    metrics = [r for r in read_metrics(d / "split") if r["phase"] == "train"]
    assert metrics[1]["time/realloc/actor_gen"] > 0  # the generation view was refilled


def test_disjoint_meshes(dist_pool, setup):
    d, model = setup
    # actor and critic train on ranks 0-1; generation on ranks 2-3; ref and critic inference on 2-3
    calls = _calls({"ranks": "2-3", "tp": 2}, {"ranks": "0-1", "tp": 2}, {"ranks": "2-3", "tp": 1})
    calls["critic_train"] = {"model": "critic", "ranks": "0-1", "tp": 1}
    dist_pool(4).run(_run, _config(d, model, "disjoint", calls))
    _compare(d, "shared", "disjoint")
    assert os.path.exists(d / "disjoint" / "checkpoints" / "latest")
    assert json.load(open(d / "disjoint" / "checkpoints" / "step_2" / "host_state.json"))["step"] == 2


def test_fast_engine_run_matches_the_reference_engine_run(dist_pool, setup):
    # generation.engine=fast on the CPU: the rollouts go through the fast engine (one session per
    # rollout, 3 slots refilled as sequences finish, for each replica's 8 prompts) and the run
    # matches the reference engine's run (the "shared" one: one static batch) for the same seed
    d, model = setup
    cfg = _config(d, model, "fast", _calls({"tp": 2, "pp": 1}, {"tp": 2, "pp": 1}, {"tp": 2, "pp": 1}))
    cfg["generation"]["engine"] = "fast"
    cfg["generation"]["batch_size"] = 3
    assert all(n > 0 for n in dist_pool(4).run(_run_counting_fast_calls, cfg))
    _compare(d, "shared", "fast")


def test_unknown_generation_engine_is_one_line(setup):
    from meshrl.engine.runtime.config import RunConfigError
    d, model = setup
    cfg = _config(d, model, "bad", {})
    cfg["generation"]["engine"] = "turbo"
    with pytest.raises(RunConfigError, match=r"^generation\.engine=turbo: use one of auto, fast, reference$"):
        load_run_config(None, [], base=cfg)


def _concurrency(cfg):
    import time

    import torch

    from meshrl.engine.runtime.context import Job, RunContext
    ctx = RunContext(load_run_config(None, [], base=cfg))

    def work(stage, local, first):  # a few hundred ms of compute, timestamps around it
        t0 = time.time()
        x = torch.randn(256, 256)
        for _ in range(600):
            x = torch.tanh(x @ x)
        return [(t0, time.time())] * len(local)

    ctx.barrier()  # all ranks start together, so only the runtime could serialise the two calls
    jobs = [Job("ref_inf", [0, 1], work), Job("critic_train", [0, 1], work)]
    ref, critic = ctx.executor.run_sharded_many(jobs)
    ctx.close()
    return ref[0], critic[0]


def test_calls_on_disjoint_meshes_run_at_the_same_time(dist_pool, setup):
    d, model = setup
    calls = _calls({"ranks": "2-3", "tp": 2}, {"ranks": "0-1", "tp": 2}, {"ranks": "2-3", "tp": 1})
    calls["critic_train"] = {"model": "critic", "ranks": "0-1", "tp": 1}
    cfg = _config(d, model, "concurrent", calls)
    (ref_span, critic_span), *_ = dist_pool(4).run(_concurrency, cfg)
    # ref inference (ranks 2-3) and critic work (ranks 0-1) overlap in time: neither waited for the other
    assert ref_span[0] < critic_span[1] and critic_span[0] < ref_span[1], (ref_span, critic_span)
