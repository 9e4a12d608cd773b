"""`meshrl bench` on the CPU: a tiny PPO run's measured seconds per call next to `meshrl plan`'s
estimate from the committed CPU calibration. The point is the printed error; the assertions only
keep the comparison honest (finite, positive, within a generous 10×)."""
import math

import pytest
import torch

from meshrl.engine.data.jsonl import write_jsonl
from meshrl.planning.bench import STEP_ROW, bench_config, format_bench
from meshrl.engine.runtime.config import load_run_config
from meshrl.engine.tasks import make_dataset
from meshrl.study.setup import init_scratch_model

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.fixture
def one_thread():
    """The calibration in benchmarks/rates.json was measured with one torch thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_plan_estimate_against_measured_cpu_run(tmp_path, one_thread):
    model = init_scratch_model(str(tmp_path / "init"), seed=0, overrides=TINY)
    write_jsonl(tmp_path / "prompts.jsonl", make_dataset(200, seed=5, digits=(1, 2)))
    base = dict(algorithm="ppo", seed=7,
                models={"actor": {"path": model}, "ref": {"path": model}, "critic": {"path": model}},
                data={"train": str(tmp_path / "prompts.jsonl"), "max_len": 48, "max_prompt_len": 16},
                reward={"verifier": "arithmetic"}, generation={"max_new_tokens": 8, "top_k": 0},
                ppo={"batch_size": 32, "minibatches": 2}, logging={"tensorboard": False},
                cluster={"nodes": 1, "gpus_per_node": 1})
    res = bench_config(load_run_config(None, [], base=base), iterations=4,
                       run_dir=str(tmp_path / "run"))
    print()
    print(format_bench(res))
    assert res["plan"].rates.device == "cpu"
    rows = {r["call"]: r for r in res["rows"]}
    for name in ("actor_gen", "actor_inf", "ref_inf", "critic_inf", "actor_train", "critic_train",
                 STEP_ROW):
        m, e = rows[name]["measured_s"], rows[name]["estimated_s"]
        assert math.isfinite(m) and math.isfinite(e) and m > 0 and e > 0, name
        assert 0.1 < e / m < 10, (name, m, e)
    assert rows["rew_inf"]["estimated_s"] is None  # a verifier: measured, not modelled
    work = res["workload"]
    assert 1 <= work["response_len"] <= work["decode_steps"] <= 8


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
def test_supervised_plan_estimate_against_measured_cpu_run(tmp_path, one_thread, algorithm):
    """SFT and offline DPO: the step's training call (and DPO's reference log-probs) measured
    against the plan, priced at the data lengths the steps logged."""
    model = init_scratch_model(str(tmp_path / "init"), seed=0, overrides=TINY)
    rows = [{"prompt": f"{a}+{b}=", "response": str(a + b), "chosen": str(a + b),
             "rejected": str(a + b + 1)} for a in range(10, 40) for b in range(3)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    models = {"actor": {"path": model}}
    if algorithm == "dpo":
        models["ref"] = {"path": model}
    base = dict(algorithm=algorithm, seed=7, models=models,
                data={"train": str(tmp_path / "data.jsonl"), "max_len": 48, "max_prompt_len": 16},
                **{algorithm: {"batch_size": 16}}, logging={"tensorboard": False},
                cluster={"nodes": 1, "gpus_per_node": 1})
    res = bench_config(load_run_config(None, [], base=base), iterations=4,
                       run_dir=str(tmp_path / "run"))
    print()
    print(format_bench(res))
    work, plan = res["workload"], res["plan"]
    assert 3 <= work["prompt_len"] <= 6 and 2 <= work["response_len"] <= 4  # "12+1=", "13" + EOS
    per_example = 2 if algorithm == "dpo" else 1
    assert plan.workload.tokens == pytest.approx(
        16 * per_example * (work["prompt_len"] + work["response_len"]))
    rows = {r["call"]: r for r in res["rows"]}
    for name in ("actor_train", STEP_ROW) + (("ref_inf",) if algorithm == "dpo" else ()):
        m, e = rows[name]["measured_s"], rows[name]["estimated_s"]
        assert math.isfinite(m) and math.isfinite(e) and m > 0 and e > 0, name
        assert 0.1 < e / m < 10, (name, m, e)


def test_bench_refuses_online_dpo():
    from meshrl.planning.plan import PlanError
    cfg = load_run_config(None, [], base=dict(algorithm="dpo", dpo={"rounds": 2},
                                              models={"actor": {"scratch": TINY}},
                                              data={"train": "unused.jsonl"}))
    with pytest.raises(PlanError, match=r"^dpo\.rounds=2: meshrl bench times offline DPO steps"):
        bench_config(cfg)


def test_measured_workload_comes_from_the_timed_steps(tmp_path):
    """Logged data lengths win over any rollout dump; dumps count only for the timed steps (not
    the warm-up step, not an earlier run's files in the same directory)."""
    from meshrl.planning.bench import measured
    from meshrl.engine.runtime.metrics import metrics_path

    def dump(step, prompt, response):
        write_jsonl(tmp_path / "rollouts" / f"step_{step}.jsonl",
                    [{"prompt_ids": [1] * prompt, "output_ids": [2] * response}])
    dump(0, 9, 9)  # the warm-up step
    dump(1, 4, 6)
    dump(7, 20, 20)  # an earlier run's
    write_jsonl(metrics_path(str(tmp_path)), [{"step": s, "phase": "train", "time/actor_gen": 1.0 + s}
                                              for s in (0, 1)])
    times, work = measured(str(tmp_path), skip_first=True)
    assert times["time/actor_gen"] == 2.0
    assert work == {"prompt_len": 4, "response_len": 6, "decode_steps": 6}
    write_jsonl(metrics_path(str(tmp_path)), [
        {"step": s, "phase": "train", "time/actor_train": 1.0, "data/prompt_len": 3.0 + s,
         "data/response_len": 2.0} for s in (0, 1, 2)])
    _, work = measured(str(tmp_path), skip_first=True)
    assert work == {"prompt_len": 4.5, "response_len": 2.0}
