"""Asynchronous RL (``async.max_staleness``): the schedule's staleness bound, runs on 2 gloo ranks
(generation on rank 0, every other call on rank 1) that keep it and resume exactly, a failure on
the generation mesh that stops every rank with one line, and ``max_staleness: 0`` as the
synchronous loop."""
import shutil
import time

import pytest

from meshrl.engine.data.jsonl import read_jsonl
from meshrl.engine.runtime.asynchronous import AsyncSchedule
from meshrl.engine.runtime.config import RunConfigError, load_run_config
from meshrl.engine.runtime.metrics import read_metrics
from meshrl.engine.runtime.run import run_config

from tests.engine.runtime.tiny import SEVENS, tiny_task

KEYS = ("score", "kl_seq", "actor/actor_loss", "critic/critic_loss", "response_len",
        "async/staleness_mean", "async/imp_weight_mean")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory, "async", prompts=96, std=0.2)


def _config(d, model, name, *, staleness=1, sync_every=1, iterations=4, save_every=0, split=True,
            **extra):
    calls = {"actor_gen": {"model": "actor"}, "actor_train": {"model": "actor"},
             "ref_inf": {"model": "ref"}, "critic_inf": {"model": "critic"},
             "critic_train": {"model": "critic"}}
    if split:  # generation on rank 0, every other call on rank 1
        for name_, c in calls.items():
            c["ranks"] = "0" if name_ == "actor_gen" else "1"
    cfg = {"algorithm": "ppo", "seed": 5, "run_dir": str(d / name), "save_hf": False,
           "models": {"actor": {"path": model, "optim": {"lr": 2e-3}},
                      "critic": {"path": model, "optim": {"lr": 1e-3}}, "ref": {"path": model}},
           "calls": calls,
           "data": {"train": str(d / "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
           "reward": {"verifier": SEVENS},
           "generation": {"max_new_tokens": 4, "top_k": 0},
           "ppo": {"iterations": iterations, "batch_size": 16, "minibatches": 2, "epochs": 2},
           "async": {"max_staleness": staleness, "sync_every": sync_every},
           "logging": {"progress": False, "tensorboard": False, "dump_rollouts": 16,
                       "save_every": save_every}}
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    return cfg


def _run(cfg):
    run_config(load_run_config(None, [], base=cfg))


def _rows(run_dir):
    return [r for r in read_metrics(run_dir) if r["phase"] == "train"]


def _tokens(run_dir, step):
    return [r["output_ids"] for _, r in read_jsonl(run_dir / "rollouts" / f"step_{step}.jsonl")]


# ---- the schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("staleness,sync_every", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 3)])
def test_schedule_never_trains_a_batch_more_than_max_staleness_versions_old(staleness, sync_every):
    """Play the loop's schedule (weights move at the start of an iteration, then it launches one
    batch) and check every batch's sampler against the bound, and against `sampler_version`."""
    total = 20
    sch = AsyncSchedule(staleness, sync_every, total)
    gen_version, sampled_by = 0, {b: 0 for b in range(sch.depth)}  # the first batches: version 0
    for it in range(total):
        if sch.moves_weights(it):
            gen_version = it
        b = sch.launches(it)
        if b is not None:
            sampled_by[b] = gen_version
    assert sorted(sampled_by) == list(range(total))
    stale = [b - v for b, v in sampled_by.items()]  # batch b is trained from version b
    assert max(stale) == staleness  # the bound is reached, never passed
    assert all(sch.sampler_version(b) == v for b, v in sampled_by.items())


# ---- runs on two ranks ----------------------------------------------------------------------------
def test_async_run_keeps_the_bound_and_reports_its_metrics(dist_pool, task):
    d, model = task
    pool = dist_pool(2)
    pool.run(_run, _config(d, model, "sync", staleness=0))
    pool.run(_run, _config(d, model, "n1", staleness=1))
    pool.run(_run, _config(d, model, "n2s2", staleness=2, sync_every=2, iterations=5))
    sync, n1, n2 = _rows(d / "sync"), _rows(d / "n1"), _rows(d / "n2s2")
    assert "async/staleness_mean" not in sync[0]
    # N=1: batch 0 sampled by version 0 before any training, every later batch one version old
    assert [r["async/staleness_max"] for r in n1] == [0, 1, 1, 1]
    assert [r["async/staleness_frac_1"] for r in n1] == [0, 1, 1, 1]
    # N=2, S=2 (depth 1): launched in iteration t with the weights moved at t - t % 2
    sch = AsyncSchedule(2, 2, 5)
    assert [r["async/staleness_max"] for r in n2] == [b - sch.sampler_version(b) for b in range(5)]
    assert max(r["async/staleness_max"] for r in n2) == 2
    # the first batch is sampled by the same weights with the same noise as the synchronous run's
    assert _tokens(d / "n1", 0) == _tokens(d / "sync", 0)
    assert _tokens(d / "n1", 1) != _tokens(d / "sync", 1)  # sampled by version 0, not 1
    for r in n1[:-1]:  # each samples the next batch meanwhile
        assert 0 < r["async/gen_busy"] <= 1 and 0 < r["async/train_busy"] <= 1
        assert r["time/wait/actor_gen"] >= 0
    assert n1[-1]["async/gen_busy"] == 0 and n1[-1]["async/train_busy"] == 1  # nothing left to sample
    # π_prox/π_behav: ~1 for batch 0 (same weights; engines differ only in rounding), then the
    # policy has moved; decoupled (the default) leaves out the tokens above its cap of 5
    assert abs(n1[0]["async/imp_weight_mean"] - 1) < 1e-3 and n1[0]["async/imp_capped_frac"] == 0
    for r in n1[1:]:
        assert r["async/imp_weight_max"] >= r["async/imp_weight_mean"] > 0
        assert abs(r["async/imp_weight_mean"] - 1) > 1e-3


def test_resumed_async_run_matches_the_uninterrupted_one(dist_pool, task):
    d, model = task
    pool = dist_pool(2)
    pool.run(_run, _config(d, model, "whole", staleness=2, sync_every=2, iterations=6, save_every=2))
    # a run that stopped after its step-4 checkpoint: that checkpoint alone, resumed
    part = d / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(d / "whole" / "checkpoints" / "step_4", part / "step_4")
    (part / "latest").write_text("step_4")
    pool.run(_run, _config(d, model, "part", staleness=2, sync_every=2, iterations=6, save_every=2))
    whole = {r["step"]: r for r in _rows(d / "whole")}
    for r in _rows(d / "part"):
        assert r["step"] in (4, 5)
        for k in KEYS:
            assert r[k] == whole[r["step"]][k], (r["step"], k)
    for step in (4, 5):
        assert _tokens(d / "part", step) == _tokens(d / "whole", step)


def test_async_run_resumed_from_a_synchronous_checkpoint_fills_the_generation_mesh(dist_pool, task):
    """A synchronous run's checkpoint at step 3 (off async.sync_every=2's schedule, and holding no
    batches sampled ahead) resumed asynchronously: the generation mesh gets the checkpoint's weights
    at once, so batch 3 is on policy."""
    d, model = task
    pool = dist_pool(2)
    pool.run(_run, _config(d, model, "sync3", staleness=0, iterations=4, save_every=3))
    part = d / "async3" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(d / "sync3" / "checkpoints" / "step_3", part / "step_3")
    (part / "latest").write_text("step_3")
    pool.run(_run, _config(d, model, "async3", staleness=2, sync_every=2, iterations=5))
    rows = _rows(d / "async3")
    assert [r["step"] for r in rows] == [3, 4]
    assert rows[0]["async/staleness_max"] == 0
    assert abs(rows[0]["async/imp_weight_mean"] - 1) < 1e-3


def _run_failing_generation(cfg):
    """Generation raises on its second batch (rank 0's background thread); returns what each rank
    raised and how long it took to stop after the failure."""
    import meshrl.engine.runtime.rollout as rollout
    orig, calls = rollout.generator, [0]
    failed_at = []

    def failing(stage, engine):
        calls[0] += 1
        if calls[0] == 2:
            failed_at.append(time.monotonic())
            raise RuntimeError("injected generation failure")
        return orig(stage, engine)
    rollout.generator = failing
    t0 = time.monotonic()
    try:
        _run(cfg)
    except Exception as e:  # noqa: BLE001 - the test reads it
        return type(e).__name__, str(e), time.monotonic() - t0
    finally:
        rollout.generator = orig
    return None, "", time.monotonic() - t0


def test_generation_failure_stops_every_rank_with_one_line(dist_pool, task):
    d, model = task
    out = dist_pool(2).run(_run_failing_generation, _config(d, model, "fails", staleness=1))
    for name, text, seconds in out:
        assert name == "LaunchedCallError", (name, text)
        assert seconds < 60  # stopped at the next gather, not at a collective's timeout
        assert "\n" not in text
        assert "actor_gen failed on rank 0" in text and "ranks [0]" in text
        assert "injected generation failure" in text


def _run_failing_late_on_rank_0(cfg):
    """Generation on ranks 0-1 at tp 2: rank 0's generation thread raises 3 s into its first
    launched batch, when the training rank already waits for that batch; rank 1's generation thread
    is then stuck in a tensor-parallel collective with rank 0, and never finishes."""
    import torch.distributed as dist

    import meshrl.engine.runtime.rollout as rollout
    orig, calls = rollout.generator, [0]

    def failing(stage, engine):
        calls[0] += 1
        if calls[0] == 2 and dist.get_rank() == 0:  # the first is the first batch's, sampled at once
            time.sleep(3)
            raise RuntimeError("injected generation failure")
        return orig(stage, engine)
    rollout.generator = failing
    try:
        _run(cfg)
    except Exception as e:  # noqa: BLE001 - the test reads it
        return type(e).__name__, str(e)
    finally:
        rollout.generator = orig
    return None, ""


def test_failure_on_a_multi_rank_generation_mesh_stops_every_rank(dist_pool, task):
    d, model = task
    cfg = _config(d, model, "fails_tp2", staleness=1)
    for name, c in cfg["calls"].items():
        c["ranks"] = "0-1" if name == "actor_gen" else "2"
    cfg["calls"]["actor_gen"]["tp"] = 2
    out = dist_pool(3).run(_run_failing_late_on_rank_0, cfg)
    for name, text in out:
        assert name == "LaunchedCallError", (name, text)
        assert "actor_gen failed on rank 0 of its mesh (ranks [0, 1], tp2" in text
        assert "injected generation failure" in text


# ---- configs ---------------------------------------------------------------------------------------
def test_max_staleness_zero_is_the_synchronous_loop(dist_pool, task):
    d, model = task
    pool = dist_pool(2)
    base = _config(d, model, "plain", staleness=0, split=False)
    del base["async"]
    pool.run(_run, base)
    pool.run(_run, _config(d, model, "zero", staleness=0, split=False))
    a, b = _rows(d / "plain"), _rows(d / "zero")
    assert [{k: r[k] for k in r if not k.startswith(("time/", "step_seconds", "time"))} for r in a] == \
           [{k: r[k] for k in r if not k.startswith(("time/", "step_seconds", "time"))} for r in b]
    for step in range(4):
        assert _tokens(d / "plain", step) == _tokens(d / "zero", step)


def test_generation_sharing_ranks_is_one_line(dist_pool, task):
    d, model = task
    cfg = _config(d, model, "shared", staleness=1, split=False)
    with pytest.raises(RunConfigError, match=r"calls.actor_gen needs ranks no other call uses: it "
                                             r"shares rank\(s\) 0 with calls.actor_train"):
        _run(cfg)


def _dpo_config(d, model, name, staleness):
    calls = {"actor_gen": {"model": "actor", "ranks": "0"}, "actor_train": {"model": "actor", "ranks": "1"},
             "ref_inf": {"model": "ref", "ranks": "1"}}
    return {"algorithm": "dpo", "seed": 5, "run_dir": str(d / name), "save_hf": False,
            "models": {"actor": {"path": model, "optim": {"lr": 2e-3}}, "ref": {"path": model}},
            "calls": calls, "data": {"train": str(d / "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
            "reward": {"verifier": SEVENS}, "generation": {"max_new_tokens": 4, "top_k": 0},
            "dpo": {"rounds": 3, "samples_per_prompt": 4, "prompts_per_round": 8, "batch_size": 4},
            "async": {"max_staleness": staleness},
            "logging": {"progress": False, "tensorboard": False}}


def test_iterative_dpo_samples_the_next_round_while_this_one_trains(dist_pool, task):
    d, model = task
    pool = dist_pool(2)
    pool.run(_run, _dpo_config(d, model, "dpo_sync", 0))
    pool.run(_run, _dpo_config(d, model, "dpo_async", 1))
    sync, ahead = _rows(d / "dpo_sync"), _rows(d / "dpo_async")
    assert [r["async/staleness_max"] for r in ahead] == [0, 1, 1]
    assert "async/staleness_max" not in sync[0]
    # round 0 is sampled by the same weights and noise either way; round 1 by the round-0 policy
    assert ahead[0]["score"] == sync[0]["score"] and ahead[0]["loss"] == sync[0]["loss"]
    assert ahead[1]["score"] != sync[1]["score"]
    assert all(r["pairs"] >= 1 for r in ahead)


@pytest.mark.parametrize("overrides,match", [
    (["async.max_staleness=1", "async.sync_every=2"], r"async.sync_every=2: .* use sync_every <= max_staleness"),
    (["async.imp_cap=1"], r"async.imp_cap=1.0: must exceed 1"),
    (["async.max_staleness=2", "async.sync_every=2", "logging.save_every=3"],
     r"logging.save_every=3: .* use a multiple of sync_every"),
    (["async.max_staleness=1", "grpo.dynamic_sampling=true"], r"grpo.dynamic_sampling with async"),
    (["algorithm=dpo", "dpo.rounds=2", "async.max_staleness=1", "async.correction=tis"],
     r"async.correction / async.imp_cap: dpo has no policy ratio"),
    (["algorithm=dpo", "async.max_staleness=1"], r"dpo offline \(dpo.rounds=0\) samples nothing"),
])
def test_async_config_errors_name_the_key_and_the_fix(task, overrides, match):
    d, model = task
    base = _config(d, model, "bad", staleness=0)
    base["algorithm"] = "grpo"
    del base["ppo"]
    with pytest.raises(RunConfigError, match=match):
        load_run_config(None, overrides, base=base)
