"""``calls: auto``: the search runs at start-up on the cluster torchrun gives (4 gloo ranks here),
every rank takes rank 0's plan, the run goes to the end on it, and placement.json records the plan,
which equals `meshrl plan --search` on the same config and cluster."""
import json
import os
import subprocess
import sys

import pytest

from meshrl.engine.runtime.config import RunConfigError, load_run_config
from meshrl.engine.runtime.metrics import read_metrics
from meshrl.planning.search import search_config

from tests.engine.runtime.tiny import SEVENS, tiny_task


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_task(tmp_path_factory, "auto_calls")


def _config(d, model, calls, **cluster) -> str:
    cfg = {"algorithm": "ppo", "seed": 3, "run_dir": str(d / "run"), "save_hf": False,
           "models": {"actor": {"path": model, "optim": {"lr": 1e-3}},
                      "critic": {"path": model, "optim": {"lr": 1e-3}}, "ref": {"path": model}},
           "calls": calls,
           "data": {"train": str(d / "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
           "reward": {"verifier": SEVENS}, "generation": {"max_new_tokens": 4, "top_k": 0},
           "ppo": {"iterations": 2, "batch_size": 8, "minibatches": 2},
           "cluster": {"nodes": 1, "gpus_per_node": 4, "device": "cpu", **cluster},
           "logging": {"progress": False, "tensorboard": False}}
    path = d / "auto.yaml"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_calls_auto_runs_the_searched_plan_under_torchrun(workdir):
    d, model = workdir
    # so little memory that the models' replicas cannot all sit on every rank: the plan must split
    path = _config(d, model, "auto", gpu_mem_gb=0.0012)
    expected = search_config(load_run_config(path)).plans[0].choices
    # memory forces the models apart: sharded layouts, and meshes that are not the whole cluster
    assert any(ch.tp * ch.pp > 1 for ch in expected.values()), expected
    assert len({ch.ranks for ch in expected.values()}) > 1, expected
    env = dict(os.environ, OMP_NUM_THREADS="1", MESHRL_DEVICE="cpu", PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=4", "-m", "meshrl.cli", "run", path],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    placement = json.load(open(d / "run" / "placement.json"))
    got = {n: (c["ranks"], c["tp"], c["pp"], c["dp"], c["microbatch_tokens"])
           for n, c in placement["calls"].items()}
    assert got == {n: (list(ch.ranks), ch.tp, ch.pp, ch.dp, ch.mb) for n, ch in expected.items()}
    assert placement["search"]["searched"] == "all" and placement["search"]["exact"]
    assert [r["step"] for r in read_metrics(str(d / "run")) if r["phase"] == "train"] == [0, 1]
    saved = load_run_config(str(d / "run" / "config.yaml"))  # the run's config records the plan
    assert not saved.auto_calls and set(saved.calls) == set(expected)


def test_auto_for_some_calls_keeps_the_others(workdir):
    d, model = workdir
    path = _config(d, model, {"actor_train": "auto", "actor_gen": {"model": "actor", "tp": 2}})
    cfg = load_run_config(path)
    assert cfg.auto_calls == ["actor_train"] and cfg.calls["actor_gen"].tp == 2
    res = search_config(cfg, free=cfg.auto_calls)
    assert res.plans[0].choices["actor_gen"].tp == 2  # kept as written
    with pytest.raises(RunConfigError, match=r"calls.actor_trian: auto: ppo runs no such call"):
        load_run_config(path, ["calls.actor_trian=auto"])


def test_actor_and_critic_train_side_by_side_and_every_call_is_timed(workdir, tmp_path):
    """The searched 70B plan trains the actor and the critic on disjoint meshes; here in
    miniature on 4 gloo ranks: they step in one phase, and each call's time is the slowest rank's,
    so the critic's (ranks 2–3) is logged though the logging rank 0 never runs it."""
    d, model = workdir
    calls = {"actor_train": {"model": "actor", "ranks": "0-1"}, "actor_gen": {"model": "actor", "ranks": "0-1"},
             "ref_inf": {"model": "ref", "ranks": "0-1"},
             "critic_train": {"model": "critic", "ranks": "2-3", "pp": 2},
             "critic_inf": {"model": "critic", "ranks": "2-3", "pp": 2}}
    path = _config(d, model, calls)
    env = dict(os.environ, OMP_NUM_THREADS="1", MESHRL_DEVICE="cpu", PYTHONPATH=os.getcwd())
    run_dir = tmp_path / "apart"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=4", "-m", "meshrl.cli", "run", path, f"run_dir={run_dir}"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = [r for r in read_metrics(str(run_dir)) if r["phase"] == "train"]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["time/critic_train"] > 0 and r["time/actor_train"] > 0 and r["time/critic_inf"] > 0
        assert "critic/critic_loss" in r and "actor/actor_loss" in r
        # the step's dataflow (what the plan prices as the step) holds its phases one after the
        # other, each at least as long as its longest call
        phases = [("actor_gen",), ("actor_inf", "ref_inf", "critic_inf"), ("actor_train", "critic_train")]
        floor = sum(max(r[f"time/{c}"] for c in phase) for phase in phases)
        assert floor <= r["time/dataflow"], (r["time/dataflow"], floor)
