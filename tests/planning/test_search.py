"""`meshrl plan --search`: the branch and bound against brute force, where every combination of the
free calls' layouts is priced by `plan_config` itself (an evaluator that shares none of the search's
incremental bookkeeping); every returned plan accepted by `meshrl plan`; the 70B example; the
cluster-size sweep; the one-line errors."""
import itertools
import json
import math
import os

import pytest

from meshrl import cli
from meshrl.planning import costmodel as cm
from meshrl.engine.runtime.config import load_run_config
from meshrl.planning.plan import PlanError, format_report, plan_config
from meshrl.planning.rates import load_rates
from meshrl.planning.search import Search, meshes, search_config, with_calls

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# big enough that a few GB per GPU makes layouts matter, small enough to price in milliseconds
MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)


def _cfg(algorithm="ppo", *, gpus=4, mem=8.0, overrides=()):
    models = ("actor", "critic", "ref", "reward") if algorithm == "ppo" else ("actor", "ref", "reward")
    base = dict(algorithm=algorithm, data={"train": "unused.jsonl", "max_prompt_len": 256},
                models={n: {"scratch": MODEL, "dtype": "bf16"} for n in models},
                reward={"model": "reward"}, generation={"max_new_tokens": 256, "batch_size": 64},
                ppo={"batch_size": 64, "minibatches": 2}, grpo={"batch_size": 16, "group_size": 4},
                dpo={"rounds": 2, "prompts_per_round": 64, "batch_size": 16},
                cluster={"nodes": 1, "gpus_per_node": gpus, "gpu_mem_gb": mem})
    return load_run_config(None, list(overrides), base=base)


@pytest.fixture(scope="module")
def rates():
    return load_rates("h100")


@pytest.fixture
def cached_realloc(monkeypatch):
    """Brute force prices thousands of plans: memoise the reallocation planner (a pure function of
    the model and the two layouts), which is what dominates one `plan_config`."""
    orig, memo = cm.realloc_cost, {}

    def cached(mcfg, head, dtype, src, dst, **kw):
        key = (repr(mcfg), head, dtype, tuple(src.ranks), src.tp_size, src.pp_size, src.ep_size,
               tuple(dst.ranks), dst.tp_size, dst.pp_size, dst.ep_size,
               tuple(sorted((k, v) for k, v in kw.items() if k != "spec_cache")))
        if key not in memo:
            memo[key] = orig(mcfg, head, dtype, src, dst, **kw)
        return memo[key]
    monkeypatch.setattr(cm, "realloc_cost", cached)


def _brute_force(cfg, free, rates):
    """Every combination of the free calls' layouts, priced and checked by plan_config (which
    refuses, under async, an actor_gen that shares a rank with another call). Also which side
    paces each async plan that fits ("gen" or "rest")."""
    s = Search(cfg, free=free, rates=rates, microbatch_tokens=(4096,))
    options = [s._choices(n) for n in s.order]
    costs, divide, paced = [], 0, set()
    for combo in itertools.product(*options):
        try:
            rep = plan_config(with_calls(cfg, dict(zip(s.order, combo)), s.calls), rates=rates)
        except PlanError:
            continue
        divide += 1
        if rep.fit_error is None:
            costs.append(rep.objective_seconds)
            if (a := rep.async_sides()) is not None:
                paced.add("gen" if a.gen > a.rest else "rest")
    return sorted(costs), divide, paced


# async: critic, reference and reward kept on ranks 0-1, so that actor_gen has room of its own
_APART = [f"calls.{n}.model={m}" for n, m in (("critic_train", "critic"), ("critic_inf", "critic"),
                                              ("ref_inf", "ref"), ("rew_inf", "reward"))] + [
    f"calls.{n}.ranks=0-1" for n in ("critic_train", "critic_inf", "ref_inf", "rew_inf")]


# a Qwen3-MoE actor and reference: 8 experts of which each token runs 2
_MOE = [f"models.{m}.scratch.{k}={v}" for m in ("actor", "ref") for k, v in (
    ("architectures", "[Qwen3MoeForCausalLM]"), ("num_experts", 8), ("num_experts_per_tok", 2),
    ("moe_intermediate_size", 1408))]


@pytest.mark.parametrize("algorithm,gpus,mem,free,overrides", [
    ("ppo", 4, 5.0, ["actor_train", "rew_inf"], []),
    ("ppo", 4, 5.0, ["critic_train", "critic_inf"], ["ppo.ema_ref=true"]),  # a view of a trained model
    ("ppo", 4, 5.0, ["actor_train", "actor_gen"], ["ppo.ema_ref=true"]),    # EMA blend into ref's home
    ("grpo", 4, 4.0, ["actor_train", "ref_inf"], []),
    ("dpo", 4, 3.0, ["actor_train", "ref_inf"], []),            # iterative: a round is the objective
    # async: the steady state max(generation, the rest) + move / sync_every, actor_gen apart; the
    # EMA blend on the rest's side; epochs such that either side paces some plans
    ("ppo", 4, 5.0, ["actor_gen", "actor_train"],
     ["async.max_staleness=2", "async.sync_every=2", "ppo.epochs=2", "ppo.ema_ref=true", *_APART]),
    ("grpo", 4, 4.0, ["actor_gen", "actor_train", "ref_inf"],
     ["async.max_staleness=1", "grpo.epochs=3", "calls.rew_inf.model=reward", "calls.rew_inf.ranks=0-1"]),
    # MoE actor and reference: ep (dividing dp and the experts) searched with the rest
    ("grpo", 4, 5.0, ["actor_train", "actor_gen"], _MOE),
])
def test_search_equals_exhaustive_enumeration(algorithm, gpus, mem, free, overrides, rates, cached_realloc):
    cfg = _cfg(algorithm, gpus=gpus, mem=mem, overrides=overrides)
    costs, divide, paced = _brute_force(cfg, free, rates)
    res = Search(cfg, free=free, rates=rates, microbatch_tokens=(4096,), top=3).run()
    assert res.complete and 0 < len(costs) < divide  # some fit, and memory rules out others
    if cfg.async_.max_staleness:
        assert paced == {"gen", "rest"}  # the max matters: each side is the slower in some plan
    distinct = []
    for c in costs:
        if not distinct or not math.isclose(c, distinct[-1], rel_tol=1e-12):
            distinct.append(c)
    got = [p.seconds for p in res.plans]
    assert got == pytest.approx(distinct[:3], rel=1e-9), (got, distinct[:5])
    for p in res.plans:  # each one meshrl plan accepts and prices alike
        rep = plan_config(with_calls(cfg, p.choices, Search(cfg, rates=rates).calls), rates=rates)
        assert rep.fit_error is None and rep.objective_seconds == pytest.approx(p.seconds, rel=1e-9)


def test_every_call_free_beats_or_equals_the_config_and_fits(rates):
    cfg = _cfg("ppo", gpus=8, mem=8.0)
    res = search_config(cfg, device="h100")
    assert res.complete and res.report.fit_error is None
    assert res.plans[0].seconds <= res.config_report.objective_seconds
    assert res.report.objective_seconds == pytest.approx(res.plans[0].seconds, rel=1e-9)
    assert set(res.plans[0].choices) == {"actor_train", "critic_train", "ref_inf", "rew_inf",
                                         "actor_gen", "critic_inf"}


def test_meshes_are_the_cluster_node_aligned_groups_and_node_slices():
    m = meshes(16, 8)  # 2 nodes × 8
    assert m[0] == tuple(range(16))
    assert tuple(range(8)) in m and tuple(range(8, 16)) in m
    assert tuple(range(4, 8)) in m and tuple(range(12, 16)) in m and (9,) in m
    assert tuple(range(2, 6)) not in m and tuple(range(4, 12)) not in m  # unaligned, straddling
    assert len(m) == len(set(m)) == 1 + 2 + 2 * (2 + 4 + 8)


def test_searched_config_is_accepted_by_meshrl_plan(tmp_path, capsys):
    src = tmp_path / "ppo.yaml"
    src.write_text(json.dumps({
        "algorithm": "ppo", "data": {"train": "unused.jsonl", "max_prompt_len": 256},
        "models": {n: {"scratch": MODEL, "dtype": "bf16"} for n in ("actor", "critic", "ref", "reward")},
        "reward": {"model": "reward"}, "generation": {"max_new_tokens": 256, "batch_size": 64},
        "ppo": {"batch_size": 64, "minibatches": 2},
        "cluster": {"nodes": 1, "gpus_per_node": 4, "gpu_mem_gb": 6}}))
    out = tmp_path / "searched.yaml"
    assert cli.main(["plan", str(src), "--search", "--write", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert cli.main(["plan", str(out)]) == 0
    text = capsys.readouterr().out
    step = float(next(line.split()[1] for line in text.splitlines() if line.startswith("step ")))
    assert step == pytest.approx(result["best"]["seconds"], abs=5e-4)
    assert result["exact"] and result["best"]["seconds"] <= result["config_seconds"]
    written = load_run_config(str(out))
    assert {n: (c.tp, c.pp, c.dp) for n, c in written.calls.items()} == {
        n: (c["tp"], c["pp"], c["dp"]) for n, c in result["best"]["calls"].items()}


def _write(tmp_path, algorithm="ppo", **cluster):
    path = tmp_path / f"{algorithm}.yaml"
    path.write_text(json.dumps({  # YAML reads JSON
        "algorithm": algorithm, "data": {"train": "unused.jsonl", "max_prompt_len": 256},
        "models": {n: {"scratch": MODEL, "dtype": "bf16"} for n in ("actor", "critic", "ref")},
        "reward": {"verifier": "arithmetic"}, "generation": {"max_new_tokens": 256, "batch_size": 64},
        "ppo": {"batch_size": 64, "minibatches": 2},
        "cluster": {"nodes": 1, "gpus_per_node": 2, "gpu_mem_gb": 3, **cluster}}))
    return str(path)


def test_nodes_sweep_names_the_smallest_cluster_that_fits(tmp_path, capsys):
    assert cli.main(["plan", _write(tmp_path), "--search", "--nodes", "1,2,4", "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out)
    by = {r["nodes"]: r for r in sweep["sizes"]}
    assert by[1]["seconds"] is None and "no plan fits 3 GB per GPU on 1 nodes" in by[1]["why"]
    assert sweep["smallest_that_fits"] == 2
    assert by[4]["seconds"] <= by[2]["seconds"] and by[2]["peak_gb"] <= 3


def test_a_config_that_fits_nowhere_is_one_line(tmp_path, capsys):
    assert cli.main(["plan", _write(tmp_path), "--search"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("meshrl plan: error: no plan fits 3 GB per GPU on 1 nodes")
    # every call fits alone (1.7 GB), the three models together do not: at least 2 nodes of 2
    assert "calls.actor_train's, 1.7 GB per GPU" in err and "need at least 2 nodes of 2" in err
    assert err.endswith("--nodes 2,4,8,16")
    path = os.path.join(ROOT, "examples", "ppo_llama70b.yaml")
    assert cli.main(["plan", path, "--search", "cluster.nodes=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "155.5 GB per GPU" in err and "need at least 5 nodes of 8" in err, err


@pytest.mark.parametrize("argv,flag", [
    (["--nodes", "2"], "--nodes needs --search"),
    (["--search-calls", "actor_train"], "--search-calls needs --search"),
    (["--search", "--nodes", "1,x"], "--nodes 1,x: give node counts"),
    (["--search", "--nodes", "1,2", "--write", "x.yaml"], "--write with --nodes 1,2"),
    (["--search", "--search-calls", "actor_trian"], "--search-calls actor_trian: ppo runs no such call"),
    (["--search", "--top", "0"], "--top 0"),
])
def test_bad_search_options_name_the_flag(argv, flag, capsys):
    path = os.path.join(ROOT, "examples", "ppo_arithmetic.yaml")
    assert cli.main(["plan", path, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and flag in err, err


def test_the_realloc_floor_is_below_the_planned_cost_and_close_to_it():
    """The search skips planning a reallocation when this cheap bound already rules the plan
    out, so it must never exceed the planner's seconds: random layout pairs on 2 nodes × 4 GPUs,
    tied and untied embeddings, the value head."""
    import random

    import torch
    from meshrl.engine.model.config import config_from_hf_dict
    from meshrl.parallel.layout import ParallelLayout
    rng = random.Random(0)
    kw = dict(gpus_per_node=4, intra_bw=400e9, inter_bw=50e9, local_bw=2e12, latency=1e-5)
    spans = [range(8), range(4), range(4, 8), range(2), range(6, 8)]
    close = 0
    for trial in range(40):
        tied = trial % 3 == 0
        mcfg = config_from_hf_dict({"architectures": ["LlamaForCausalLM"], **{
            **MODEL, "num_hidden_layers": 8, "hidden_size": 256, "intermediate_size": 512,
            "vocab_size": 1000}, "tie_word_embeddings": tied})
        head = "value" if trial % 4 == 1 else "lm"
        layouts = []
        for _ in range(2):
            ranks = list(rng.choice(spans))
            tp = rng.choice([t for t in (1, 2, 4) if len(ranks) % t == 0])
            pp = rng.choice([p for p in (1, 2, 4) if len(ranks) % (tp * p) == 0])
            layouts.append(ParallelLayout(ranks=ranks, tp=tp, pp=pp, dp=len(ranks) // (tp * pp),
                                          virtual=True, world_size=8))
        exact = cm.realloc_cost(mcfg, head, torch.bfloat16, *layouts, **kw)["seconds"]
        floor = cm.realloc_floor_seconds(mcfg, head, torch.bfloat16, *layouts, gpus_per_node=4,
                                         inter_bw=50e9)
        assert floor <= exact * (1 + 1e-9), (trial, layouts, floor, exact)
        close += floor >= 0.5 * exact
    assert close >= 5  # and a useful bound (zero, rightly, for moves within a node)


def test_a_phase_costs_its_busiest_rank_so_disjoint_meshes_overlap(rates):
    """ref_inf and critic_inf in one phase: on disjoint halves the phase costs the slower of the
    two; on the same ranks, their sum."""
    apart = _cfg("ppo", gpus=4, mem=80, overrides=[
        "calls.ref_inf.model=ref", "calls.ref_inf.ranks=0-1", "calls.critic_inf.model=critic",
        "calls.critic_inf.ranks=2-3", "calls.actor_train.model=actor", "calls.actor_train.ranks=0-1"])
    rep = plan_config(apart, rates=rates)
    t = {p.name: p.time.seconds for p in rep.calls}
    phase = next(p.phase for p in rep.calls if p.name == "ref_inf")
    # actor_inf (ranks 0-1) and ref_inf share ranks 0 and 1; critic_inf runs beside them on 2-3
    assert rep.phase_seconds()[phase] == pytest.approx(max(t["actor_inf"] + t["ref_inf"], t["critic_inf"]))
    together = plan_config(_cfg("ppo", gpus=4, mem=80), rates=rates)
    t2 = {p.name: p.time.seconds for p in together.calls}
    assert together.phase_seconds()[phase] == pytest.approx(t2["actor_inf"] + t2["ref_inf"] + t2["critic_inf"])
    assert "actor_inf ∥ ref_inf ∥ critic_inf" in format_report(rep)


def test_70b_search_beats_the_hand_written_plan_running_actor_and_critic_side_by_side():
    cfg = load_run_config(os.path.join(ROOT, "examples", "ppo_llama70b.yaml"))
    res = search_config(cfg, device="h100")
    hand, best = res.config_report.objective_seconds, res.plans[0]
    assert res.complete and res.report.fit_error is None
    assert best.seconds < 0.75 * hand, (best.seconds, hand)  # the goal: 25% below
    assert max(p.peak for p in res.report.calls) <= 80e9
    assert set(best.choices["actor_train"].ranks).isdisjoint(best.choices["critic_train"].ranks)
