"""`meshrl plan` under ``async.max_staleness`` > 0: a step is the steady state of the generation
side (actor_gen on ranks of its own) and the rest, max(gen, rest) + weight move / sync_every,
checked against the report's own per-call and per-move figures; the synchronous step unchanged at
max_staleness 0; the printed sides and idle fractions; the overlap error, one wording for the
planner and the runtime (`dataflow.async_overlap_error`); the search's async objective. (The search
against brute force under async: tests/planning/test_search.py.)"""
import json
import re

import pytest

from meshrl import cli
from meshrl.engine.dataflow import async_overlap, async_overlap_error
from meshrl.engine.runtime.config import load_run_config
from meshrl.planning.plan import PlanError, format_report, plan_config
from meshrl.planning.search import Search, SearchError, search_config, search_json

TINY = dict(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# actor_gen on rank 0, everything else on rank 1
APART = {"actor_gen": {"model": "actor", "ranks": "0"}, "actor_train": {"model": "actor", "ranks": "1"},
         "critic_train": {"model": "critic", "ranks": "1"}, "critic_inf": {"model": "critic", "ranks": "1"},
         "ref_inf": {"model": "ref", "ranks": "1"}}


def _base(calls=APART, gpus=2):
    return dict(algorithm="ppo", data={"train": "unused.jsonl", "max_prompt_len": 8},
                models={n: {"scratch": TINY} for n in ("actor", "critic", "ref")},
                calls=calls, reward={"verifier": "arithmetic"},
                generation={"max_new_tokens": 8, "batch_size": 4},
                ppo={"batch_size": 8, "minibatches": 2},
                cluster={"nodes": 1, "gpus_per_node": gpus, "gpu_mem_gb": 80})


def _cfg(*overrides, calls=APART, gpus=2):
    return load_run_config(None, list(overrides), base=_base(calls, gpus))


def _plan(*overrides, **kw):
    return plan_config(_cfg(*overrides, **kw), device="cpu")


# epochs=1: generation is the slower side; epochs=8: training is
@pytest.mark.parametrize("epochs,sync_every,paced_by", [(1, 2, "gen"), (8, 1, "rest"), (8, 2, "rest")])
def test_async_step_is_max_of_the_sides_plus_the_weight_move(epochs, sync_every, paced_by):
    rep = _plan(f"ppo.epochs={epochs}", "async.max_staleness=2", f"async.sync_every={sync_every}")
    t = {p.name: p.time.seconds for p in rep.calls}
    moves = {x["dst"]: x["seconds"] * x["per_step"] for x in rep.reallocs}
    # every call but actor_gen shares rank 1, so its phases are the sums of their calls
    gen = t["actor_gen"]
    rest = sum(s for name, s in t.items() if name != "actor_gen") + sum(
        s for dst, s in moves.items() if dst != "actor_gen")
    sync = moves["actor_gen"]
    assert sync > 0 and (gen > rest) == (paced_by == "gen")
    assert rep.step_seconds == pytest.approx(max(gen, rest) + sync / sync_every, rel=1e-12)
    assert rep.objective_seconds == rep.step_seconds
    # the same layouts run synchronously: every phase and move one after another
    same = _plan(f"ppo.epochs={epochs}")
    assert same.async_sides() is None
    assert same.step_seconds == pytest.approx(gen + rest + sync, rel=1e-12)
    assert rep.synchronous_step_seconds == same.step_seconds
    assert rep.step_seconds < same.step_seconds


def test_max_staleness_0_is_todays_step():
    """The synchronous report: phases one after another plus every move per step, as before async
    existed, and no async line."""
    for calls in (APART, {}):
        rep = _plan(calls=calls)
        assert rep.max_staleness == 0 and rep.async_sides() is None
        assert rep.step_seconds == (sum(rep.phase_seconds().values())
                                    + sum(x["seconds"] * x["per_step"] for x in rep.reallocs))
        assert rep.step_seconds == rep.synchronous_step_seconds
        assert "async" not in format_report(rep)


def test_report_prints_each_sides_seconds_and_idle_fraction():
    rep = _plan("async.max_staleness=2", "async.sync_every=2")
    a = rep.async_sides()
    text = format_report(rep)
    (line,) = [x for x in text.splitlines() if x.startswith("async steady state:")]
    nums = [float(x) for x in re.findall(r"(-?[\d.]+)(?:%| s)", line)]
    gen, gen_idle, rest, rest_idle, move, step, sync_step, gain = nums
    assert (gen, rest, move, step, sync_step) == pytest.approx(
        (a.gen, a.rest, a.sync / 2, a.step, rep.synchronous_step_seconds), abs=5e-4)
    assert gen_idle == pytest.approx(100 * (1 - a.gen / a.step), abs=0.05)
    assert rest_idle == pytest.approx(100 * (1 - a.rest / a.step), abs=0.05)
    assert gain == pytest.approx(100 * (a.step / rep.synchronous_step_seconds - 1), abs=0.05)
    assert rest_idle > 10 and gen_idle < rest_idle  # generation paces this one; training waits
    assert "async.max_staleness=2" in text and "async.sync_every=2" in text
    assert re.search(r"realloc/actor_gen +[\d.]+  \(one move of [\d.]+ s every 2 steps\)", text)
    assert re.search(r"actor_train → actor_gen .* 1/2$", text, re.MULTILINE)  # the realloc table's per step
    step_row = next(x for x in text.splitlines() if x.startswith("step "))
    assert float(step_row.split()[1]) == pytest.approx(a.step, abs=5e-4)


def test_overlap_is_one_line_naming_both_calls_and_the_fix():
    calls = {**APART, "critic_inf": {"model": "critic", "ranks": "0-1"}}
    with pytest.raises(PlanError) as e:
        _plan("async.max_staleness=3", "async.sync_every=3", calls=calls)
    assert str(e.value) == (
        "async.max_staleness=3 overlaps generation with training, so calls.actor_gen needs ranks no "
        "other call uses: it shares rank(s) 0 with calls.critic_inf; give actor_gen ranks of its own")
    # the default layout (every rank) overlaps too; synchronous, the same config is fine
    with pytest.raises(PlanError, match=r"shares rank\(s\) 0-1 with calls\.actor_train; give"):
        _plan("async.max_staleness=1", calls={})
    _plan(calls=calls)


def test_async_overlap_is_pure_and_names_the_first_call_by_name():
    calls = {"rew_inf": [6, 7], "actor_gen": [0, 1, 2, 3, 6, 7], "critic_inf": [3, 2, 9], "x": []}
    assert async_overlap(calls) == ("critic_inf", (2, 3))
    assert async_overlap({"actor_gen": [0, 1], "actor_train": [2, 3]}) is None
    assert async_overlap({"actor_train": [0]}) is None
    assert async_overlap_error(0, calls) is None  # synchronous: sharing is the normal case
    assert "shares rank(s) 0-3,6-7 with calls.actor_train;" in async_overlap_error(
        2, {"actor_gen": [7, 0, 1, 2, 3, 6], "actor_train": range(8)})


def test_async_search_gives_actor_gen_ranks_of_its_own_and_prices_the_steady_state():
    cfg = _cfg("async.max_staleness=1", "ppo.epochs=4", calls={}, gpus=4)
    res = search_config(cfg, device="cpu")
    assert res.complete and res.report.fit_error is None
    best = res.plans[0].choices
    gen = set(best["actor_gen"].ranks)
    assert all(gen.isdisjoint(ch.ranks) for name, ch in best.items() if name != "actor_gen")
    a = res.report.async_sides()
    assert res.plans[0].seconds == pytest.approx(a.step, rel=1e-9)
    # the config's own layouts (every call on every rank) cannot run async: said, not priced
    assert res.config_report is None and any("shares rank(s) 0-3" in n for n in res.notes)
    j = search_json(res, res.calls)["best"]["async"]
    assert j["step_seconds"] == pytest.approx(res.plans[0].seconds, rel=1e-12)
    assert j["generation_idle"] == pytest.approx(1 - a.gen / a.step)
    assert j["synchronous_step_seconds"] == res.report.synchronous_step_seconds


def test_search_with_fixed_calls_that_overlap_is_the_same_error():
    calls = {**APART, "ref_inf": {"model": "ref", "ranks": "0"}}
    cfg = _cfg("async.max_staleness=1", calls=calls)
    with pytest.raises(SearchError) as e:
        Search(cfg, free=["actor_train"])
    assert str(e.value) == async_overlap_error(1, {"actor_gen": [0], "ref_inf": [0]})
    # actor_gen free but the fixed calls hold every rank: nowhere to put it
    with pytest.raises(SearchError, match=r"calls kept fixed \(actor_train, critic_inf, critic_train, "
                                          r"ref_inf\) use every rank"):
        Search(_cfg("async.max_staleness=1", calls={**APART, "ref_inf": {"model": "ref", "ranks": "0-1"}}),
               free=["actor_gen"])


def test_meshrl_plan_search_json_carries_the_sides(tmp_path, capsys):
    path = tmp_path / "ppo.json.yaml"
    path.write_text(json.dumps({**_base({}, gpus=4), "async": {"max_staleness": 2, "sync_every": 2}}))
    assert cli.main(["plan", str(path), "--search", "--json", "--device", "cpu"]) == 0
    best = json.loads(capsys.readouterr().out)["best"]
    a = best["async"]
    assert (a["max_staleness"], a["sync_every"]) == (2, 2)
    assert a["step_seconds"] == pytest.approx(best["seconds"], rel=1e-12)
    assert a["step_seconds"] == pytest.approx(
        max(a["generation_seconds"], a["training_seconds"]) + a["weight_move_seconds"] / 2, rel=1e-12)
    assert 0 <= a["generation_idle"] < 1 and 0 <= a["training_idle"] < 1


def test_async_iterative_dpo_is_refused_by_plan_and_search_in_one_line():
    calls = {"actor_gen": {"model": "actor", "ranks": "0"}, "actor_train": {"model": "actor", "ranks": "1"},
             "ref_inf": {"model": "ref", "ranks": "1"}}
    base = dict(_base(calls), algorithm="dpo", dpo={"rounds": 2, "prompts_per_round": 8, "batch_size": 4})
    del base["ppo"]
    cfg = load_run_config(None, ["async.max_staleness=1"], base=base)
    for fn in (lambda: plan_config(cfg, device="cpu"), lambda: Search(cfg, rates=None)):
        with pytest.raises(PlanError, match=r"async.max_staleness=1 with iterative dpo: meshrl plan "
                                            r"prices a round's sampling before its steps") as e:
            fn()
        assert "\n" not in str(e.value)
    plan_config(load_run_config(None, [], base=base), device="cpu")  # synchronous rounds are priced
