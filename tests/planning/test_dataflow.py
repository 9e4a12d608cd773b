"""The runtime executes what the planner prices. One dataflow table (`meshrl.engine.dataflow`)
drives both; these tiny runs on 2 gloo ranks record what each step executed (run_dir/dataflow.json:
its gathers in order, the views it refilled, the blends) and the test compares that with
`plan_config` for the same config: the phases and their calls, how often each runs, which views
are refilled every step, the EMA blends, and the bytes each reallocation moves."""
import json
from collections import Counter

import pytest

from meshrl.engine.data.jsonl import write_jsonl
from meshrl.engine.dataflow import DATAFLOWS, TRAIN
from meshrl.engine.runtime.config import load_run_config
from meshrl.engine.runtime.run import run_config
from meshrl.engine.tasks import make_dataset
from meshrl.planning.plan import plan_config
from meshrl.study.setup import init_scratch_model

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dataflow")
    model = init_scratch_model(str(d / "init"), seed=8, overrides=TINY)
    write_jsonl(d / "prompts.jsonl", make_dataset(64, seed=9, digits=(1, 2)))
    return d, model


def _config(d, model, name, algorithm, calls, **section):
    models = {"actor": {"path": model, "optim": {"lr": 1e-3}}, "ref": {"path": model}}
    if algorithm == "ppo":
        models["critic"] = {"path": model, "optim": {"lr": 1e-3}}
    return {"algorithm": algorithm, "seed": 3, "run_dir": str(d / name), "save_hf": False,
            "cluster": {"nodes": 1, "gpus_per_node": 2, "device": "cpu"},
            "models": models, "calls": calls,
            "data": {"train": str(d / "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
            "reward": {"verifier": "tests.engine.runtime.toy_rewards:sevens"},
            "generation": {"max_new_tokens": 4, "top_k": 0},
            algorithm: {"iterations": 2, "batch_size": 8, "minibatches": 2, **section},
            "logging": {"progress": False, "tensorboard": False}}


def _run(cfg):
    run_config(load_run_config(None, [], base=cfg))


def _expected_gathers(plan) -> list[list[str]]:
    """The plan's per-step rows as the runtime's gathers: one per phase, the train phase once per
    minibatch update."""
    phases: dict[int, list] = {}
    for p in plan.calls:
        if not p.per_round:
            phases.setdefault(p.phase, []).append(p)
    return [sorted(p.name for p in rows)
            for _, rows in sorted(phases.items())
            for _ in range(plan.workload.updates if any(p.kind == TRAIN for p in rows) else 1)]


def _check(d, name, cfg):
    plan = plan_config(load_run_config(None, [], base=cfg), world=2)
    doc = json.load(open(d / name / "dataflow.json"))
    steady = doc["steps"]["1"]  # step 0 also fills every view once
    gathers = [sorted(e["call"] for e in g["gather"] if not e.get("host")) for g in steady if "gather" in g]
    assert [g for g in gathers if g] == _expected_gathers(plan)
    views = [r for r in plan.reallocs if "(EMA)" not in r["model"]]
    assert Counter(e["realloc"] for e in steady if "realloc" in e) == \
        Counter({r["dst"]: r["per_step"] for r in views if r["per_step"]})
    ema = [r for r in plan.reallocs if "(EMA)" in r["model"]]
    assert sum("blend" in e for e in steady) == sum(r["per_step"] for r in ema)
    placement = json.load(open(d / name / "placement.json"))
    for r in views:  # the cost model's bytes are the runtime's own reallocation plan's
        moved = placement["reallocation"][r["dst"]]
        assert (r["remote_bytes"], r["local_bytes"]) == (moved["remote_bytes"], moved["local_bytes"]), r["dst"]
    return plan, steady


def test_ppo_run_executes_the_planned_dataflow(dist_pool, setup):
    d, model = setup
    # actor trains tp2 and generates tp1·dp2 (a view); the critic infers on rank 1 alone (a view);
    # the reference lives on rank 0, the EMA blend moves the actor's tp2 weights into it
    calls = {"actor_gen": {"model": "actor", "tp": 1}, "actor_train": {"model": "actor", "tp": 2},
             "ref_inf": {"model": "ref", "ranks": "0"}, "critic_inf": {"model": "critic", "ranks": "1"},
             "critic_train": {"model": "critic", "tp": 2}}
    cfg = _config(d, model, "ppo", "ppo", calls, ema_ref=True, ema_alpha=0.9)
    dist_pool(2).run(_run, cfg)
    plan, steady = _check(d, "ppo", cfg)
    # every call of the table but the reward model's (a verifier scores on the host)
    assert [p.name for p in plan.calls] == [c.name for c in DATAFLOWS["ppo"].calls() if c.name != "rew_inf"]
    assert {r["dst"] for r in plan.reallocs if r["per_step"]} == {"actor_gen", "critic_inf", "ref_inf"}
    assert sum("blend" in e for e in steady) == 2  # one per minibatch update


def test_grpo_without_kl_neither_runs_nor_prices_the_reference(dist_pool, setup):
    d, model = setup
    calls = {"actor_gen": {"model": "actor", "tp": 1}, "actor_train": {"model": "actor", "tp": 2},
             "ref_inf": {"model": "ref", "ranks": "0"}}
    cfg = _config(d, model, "grpo", "grpo", calls, group_size=2, kl_coef=0.0)
    dist_pool(2).run(_run, cfg)
    plan, steady = _check(d, "grpo", cfg)
    assert "ref_inf" not in [p.name for p in plan.calls]
    assert not any(e["call"] == "ref_inf" for g in steady if "gather" in g for e in g["gather"])


MOE = dict(TINY, architectures=["Qwen3MoeForCausalLM"], num_experts=4, num_experts_per_tok=2,
           moe_intermediate_size=32)


def test_moe_grpo_with_ep_executes_the_planned_dataflow(dist_pool, setup, tmp_path_factory):
    """A Qwen3-MoE actor trains at dp2·ep2 (each rank two of the four experts) and generates at
    tp2 (every expert on both ranks, split by tp): the view's refill moves the bytes the planner
    prices, and the steps run the planned phases."""
    d, _ = setup
    model = init_scratch_model(str(tmp_path_factory.mktemp("moe") / "init"), seed=8, overrides=MOE)
    calls = {"actor_gen": {"model": "actor", "tp": 2}, "actor_train": {"model": "actor", "ep": 2},
             "ref_inf": {"model": "ref", "ep": 2}}
    cfg = _config(d, model, "grpo_moe", "grpo", calls, group_size=2)
    dist_pool(2).run(_run, cfg)
    plan, _ = _check(d, "grpo_moe", cfg)
    assert {p.name: p.tag for p in plan.calls} == {"actor_gen": "tp2·pp1·dp1", "ref_inf": "tp1·pp1·dp2·ep2",
                                                   "actor_inf": "tp1·pp1·dp2·ep2",
                                                   "actor_train": "tp1·pp1·dp2·ep2"}
    (refill,) = plan.reallocs
    assert refill["dst"] == "actor_gen" and refill["per_step"] == 1 and refill["remote_bytes"] > 0
    assert all(p.time.a2a_seconds > 0 for p in plan.calls if p.spec.ep > 1)
    placement = json.load(open(d / "grpo_moe" / "placement.json"))
    assert placement["calls"]["actor_train"]["ep"] == 2 and placement["calls"]["actor_gen"]["ep"] == 1
