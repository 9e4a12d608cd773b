"""The algorithm menu end to end: each shipped example config (DAPO, RLOO, REINFORCE++ at tp=2 or
pp=2, asynchronous GRPO with generation on a rank of its own) runs on gloo with its own settings —
only the model, data, reward and sizes are swapped for tiny ones — and raises the reward; DAPO's dynamic sampling fills its batch, says so when it cannot
(naming the knob) and resumes with the same prompt stream."""
import json
import os

import pytest

from meshrl.engine.data.jsonl import write_jsonl
from meshrl.engine.runtime.config import load_run_config
from meshrl.engine.runtime.metrics import read_metrics
from meshrl.engine.runtime.run import run_config

from tests.engine.runtime.tiny import SEVENS, tiny_task

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_task(tmp_path_factory, "menu", prompts=300)


def _overrides(d, model, name, layout, **grpo):
    """The example's algorithm settings as shipped; what is swapped for a tiny, fast run."""
    out = [f"run_dir={d / name}", f"models.actor.path={model}", f"data.train={d / 'prompts.jsonl'}",
           "data.eval=null", "data.max_len=24", "data.max_prompt_len=12",
           f"reward.verifier={SEVENS}", "generation.max_new_tokens=4", "models.actor.optim.lr=3e-3",
           "logging.progress=false", "logging.tensorboard=false", "logging.eval_every=0",
           "logging.save_every=0", "save_hf=false", *(f"calls.actor_train.{k}={v}" for k, v in layout.items())]
    out += [f"grpo.{k}={v}" for k, v in grpo.items()]
    return out


def _run(path, overrides):
    import torch.distributed as dist
    cfg = load_run_config(path, overrides)
    if "ref" in cfg.models:
        cfg.models["ref"].path = cfg.models["actor"].path
    run_config(cfg)
    return dist.get_rank()


def _train_rows(run_dir):
    return [r for r in read_metrics(run_dir) if r["phase"] == "train"]


def _moved(rows, metric="score"):
    vals = [r[metric] for r in rows]
    return sum(vals[:4]) / 4, sum(vals[-4:]) / 4


# (example, layout, size overrides): every example at tp=2 or pp=2
CASES = {"dapo": ({"tp": 2}, {"iterations": 12, "batch_size": 4, "group_size": 4, "overlong_buffer": 1}),
         "rloo": ({"pp": 2}, {"iterations": 12, "batch_size": 8, "group_size": 4}),
         "reinforce_pp": ({"tp": 2}, {"iterations": 12, "batch_size": 32}),
         # asynchronous: generation on rank 0 samples the next batch while rank 1 trains
         "grpo_async": ({}, {"iterations": 12, "batch_size": 8, "group_size": 4})}


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_config_runs_and_raises_the_reward(dist_pool, workdir, name):
    d, model = workdir
    layout, sizes = CASES[name]
    path = os.path.join(EXAMPLES, f"{name}_arithmetic.yaml")
    dist_pool(2).run(_run, path, _overrides(d, model, name, layout, **sizes))
    rows = _train_rows(d / name)
    assert len(rows) == sizes["iterations"]
    first, last = _moved(rows)
    assert last > first + 0.1, (name, first, last)
    if name == "dapo":
        # every step filled its batch of groups with a spread, drawing more prompts when needed
        assert all(r["sampling/groups_kept"] == sizes["batch_size"] for r in rows)
        assert any(r["sampling/draws"] > 1 for r in rows) and "overlong_penalty" in rows[0]
        assert "kl_seq" not in rows[0]  # no KL term, no reference model
    else:
        assert "kl_seq" in rows[0]
    if name == "grpo_async":
        assert [r["async/staleness_max"] for r in rows] == [0] + [1] * (len(rows) - 1)


def _dapo(d, model, name, **extra):
    sizes = dict(iterations=4, batch_size=4, group_size=4, overlong_buffer=1, **extra)
    return load_run_config(os.path.join(EXAMPLES, "dapo_arithmetic.yaml"),
                           _overrides(d, model, name, {}, **sizes) + ["logging.save_every=2"])


def test_dynamic_sampling_that_cannot_fill_a_batch_says_so(workdir, capsys):
    d, model = workdir
    cfg = _dapo(d, model, "starved", max_sampling_rounds=3)
    cfg.reward.verifier = "tests.engine.runtime.toy_rewards:constant"
    cfg.grpo.iterations = 2
    run_config(cfg)
    out = capsys.readouterr().out
    assert "grpo step 0: dynamic sampling kept 0 of 4 groups after 3 draws of 4 prompts" in out
    assert "raise grpo.max_sampling_rounds" in out
    rows = _train_rows(d / "starved")
    assert [r["sampling/draws"] for r in rows] == [3.0, 3.0]  # the cap holds: it terminates
    assert [r["sampling/prompts_drawn"] for r in rows] == [12.0, 12.0]
    assert all(r["sampling/groups_kept"] == 0 and "actor/actor_loss" not in r for r in rows)


def test_dynamic_sampling_resumes_with_the_same_prompt_stream(workdir):
    d, model = workdir
    whole = _dapo(d, model, "whole")
    run_config(whole)
    half = _dapo(d, model, "halves")
    half.grpo.iterations = 2  # stops after 2 steps; the next run resumes from its checkpoint
    run_config(half)
    ckpt = json.load(open(d / "halves" / "checkpoints" / "step_2" / "host_state.json"))
    assert ckpt["prompt_position"] >= 8  # at least one draw of 4 prompts per step, kept
    run_config(_dapo(d, model, "halves"))

    def rows(name):
        return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")
                 and k != "step_seconds"} for r in _train_rows(d / name)]
    assert rows("halves") == rows("whole")


def test_menu_config_errors_are_one_line(workdir):
    from meshrl.engine.runtime.config import RunConfigError
    d, model = workdir
    rloo = os.path.join(EXAMPLES, "rloo_arithmetic.yaml")
    for override, message in [
            ("grpo.advantage=ppo2", "grpo.advantage=ppo2: use one of grpo, dr_grpo, rloo, reinforce_pp, "
                                    "reinforce_pp_baseline, remax"),
            ("grpo.policy_loss=cispo", "grpo.policy_loss=cispo: use one of clip, dual_clip, gspo"),
            ("grpo.loss_agg=token-sum", "grpo.loss_agg=token-sum: use one of token-mean, seq-mean-token-sum"),
            ("grpo.kl_in=both", "grpo.kl_in=both: use one of loss, reward"),
            ("grpo.clip_eps_high=0", "grpo.clip_eps_high=0.0: must be greater than 0"),
            ("grpo.group_size=1", "grpo.group_size=1: grpo.advantage=rloo compares the samples of a "
                                  "prompt with each other, so it needs at least 2"),
            ("grpo.overlong_buffer=7", "grpo.overlong_buffer=7 exceeds generation.max_new_tokens=6"),
            ("grpo.max_sampling_rounds=0", "grpo.max_sampling_rounds=0: must be at least 1")]:
        with pytest.raises(RunConfigError, match=message):
            load_run_config(rloo, [override])
    with pytest.raises(RunConfigError, match="grpo.clip_ratio_c=1.0: must exceed 1"):
        load_run_config(rloo, ["grpo.policy_loss=dual_clip", "grpo.clip_ratio_c=1.0"])
    with pytest.raises(RunConfigError, match="grpo.kl_coef=0.05 needs a reference model: add models.ref"):
        load_run_config(os.path.join(EXAMPLES, "dapo_arithmetic.yaml"), ["grpo.kl_coef=0.05"])
    with pytest.raises(RunConfigError, match="ppo.advantage=rloo: ppo's advantages come from its critic"):
        load_run_config(os.path.join(EXAMPLES, "ppo_arithmetic.yaml"), ["ppo.advantage=rloo"])
    # group_size 1 is fine where no group is compared
    assert load_run_config(os.path.join(EXAMPLES, "reinforce_pp_arithmetic.yaml")).grpo.group_size == 1


def test_stop_at_pass_rate_ends_a_run_at_its_first_good_evaluation(workdir, capsys):
    from meshrl.engine.data.jsonl import read_jsonl
    d, model = workdir
    sft_file = d / "sft.jsonl"
    write_jsonl(sft_file, [{"prompt": r["prompt"], "response": r["answer"]}
                           for _, r in read_jsonl(d / "prompts.jsonl")])
    base = dict(algorithm="sft", seed=1, run_dir=str(d / "early"), save_hf=False,
                models={"actor": {"path": model, "optim": {"lr": 1e-3}}},
                data={"train": str(sft_file), "eval": str(d / "prompts.jsonl"), "eval_samples": 8,
                      "max_len": 24, "max_prompt_len": 12},
                reward={"verifier": "tests.engine.runtime.toy_rewards:always_right"},
                generation={"max_new_tokens": 4}, sft={"batch_size": 8, "steps": 10},
                logging={"progress": False, "tensorboard": False, "eval_every": 3,
                         "stop_at_pass_rate": 0.9})
    result = run_config(load_run_config(None, [], base=base))
    assert result == {"pass_rate": 1.0}
    rows = read_metrics(d / "early")
    assert [r["step"] for r in rows if r["phase"] == "train"] == [0, 1, 2]
    assert [r["step"] for r in rows if r["phase"] == "eval"] == [3]  # no second, final evaluation
    assert sorted(os.listdir(d / "early" / "checkpoints")) == ["latest", "step_3"]
    assert "stopping" in capsys.readouterr().out
    # started again, it is complete: nothing reruns, the evaluation it stopped at comes back
    assert run_config(load_run_config(None, [], base=base)) == {"pass_rate": 1.0}
    assert "complete at step 3; nothing to run" in capsys.readouterr().out
    assert len(read_metrics(d / "early")) == len(rows)
    with pytest.raises(Exception, match="logging.stop_at_pass_rate=0.9 needs a held-out pass rate"):
        load_run_config(None, ["logging.eval_every=0"], base=base)


# the rest of the menu, one process, two steps each: every choice runs and its own metrics appear
MENU = {"remax": {"advantage": "remax", "group_size": 2},
        "reinforce_pp_baseline": {"advantage": "reinforce_pp_baseline", "kl_in": "reward"},
        "dr_grpo": {"advantage": "dr_grpo", "loss_agg": "seq-mean-token-sum-norm", "kl_coef": 0.0},
        "gspo": {"policy_loss": "gspo", "clip_eps_low": 3e-4, "clip_eps_high": 4e-4,
                 "loss_agg": "seq-mean-token-mean", "minibatches": 1},
        "dual_clip": {"policy_loss": "dual_clip", "overlong_filter": True, "entropy_coef": 0.01}}


@pytest.mark.parametrize("name", sorted(MENU))
def test_every_menu_choice_runs(workdir, name):
    d, model = workdir
    grpo = {"iterations": 2, "batch_size": 4, "group_size": 4, "minibatches": 2, **MENU[name]}
    base = dict(algorithm="grpo", seed=2, run_dir=str(d / f"menu_{name}"), save_hf=False,
                models={"actor": {"path": model, "optim": {"lr": 1e-3}}, "ref": {"path": model}},
                data={"train": str(d / "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
                reward={"verifier": SEVENS}, generation={"max_new_tokens": 4, "top_k": 0},
                grpo=grpo, logging={"progress": False, "tensorboard": False})
    run_config(load_run_config(None, [], base=base))
    rows = _train_rows(d / f"menu_{name}")
    assert len(rows) == 2 and all(abs(r["actor/actor_loss"]) < 1e3 for r in rows)
    first = rows[0]
    if name == "remax":  # the greedy baseline was generated and scored
        assert 0.0 <= first["greedy_score"] <= 1.0
    if name == "gspo":
        # one minibatch: every ratio is taken before the update, so the sequence ratios are 1
        assert first["actor/seq_ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    if name == "dual_clip":
        assert "actor/clip_frac_lower" in first and "actor/entropy" in first
        assert first["counted_frac"] == pytest.approx(1 - first["truncated"])
    if name == "dr_grpo":
        assert "kl_seq" not in first  # no KL term: the reference is not even run


def test_ppo_without_a_kl_term_needs_no_reference(workdir):
    d, model = workdir
    base = dict(algorithm="ppo", seed=2, run_dir=str(d / "ppo_no_ref"), save_hf=False,
                models={"actor": {"path": model, "optim": {"lr": 1e-3}},
                        "critic": {"path": model, "optim": {"lr": 1e-3}}},
                data={"train": str(d / "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
                reward={"verifier": SEVENS}, generation={"max_new_tokens": 4, "top_k": 0},
                ppo={"iterations": 2, "batch_size": 8, "minibatches": 2, "kl_coef": 0.0},
                logging={"progress": False, "tensorboard": False})
    run_config(load_run_config(None, [], base=base))
    rows = _train_rows(d / "ppo_no_ref")
    assert len(rows) == 2 and "kl_seq" not in rows[0] and rows[0]["kl_coef"] == 0.0
    # the shaped reward is the score alone: its per-response total is the mean score
    assert rows[0]["reward_total"] == pytest.approx(rows[0]["score"], abs=1e-6)
