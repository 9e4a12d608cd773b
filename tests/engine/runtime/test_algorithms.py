"""PPO, GRPO, DPO, SFT and reward-model runs end to end at tp=2 or pp=2 on gloo, each checked to move
its metric the way the algorithm implies (mean of the last 5 steps against the first 5)."""
import json
import os

import pytest

from meshrl.engine.data.jsonl import write_jsonl
from meshrl.engine.runtime.config import load_run_config
from meshrl.engine.runtime.metrics import read_metrics
from meshrl.engine.runtime.run import run_config
from meshrl.engine.tasks import make_dataset
from meshrl.study.setup import init_scratch_model

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("algos")
    model = init_scratch_model(str(d / "init"), seed=3, overrides=TINY)
    recs = make_dataset(300, seed=5, digits=(1, 2))
    write_jsonl(d / "prompts.jsonl", recs)
    write_jsonl(d / "sft.jsonl", [{"prompt": r["prompt"], "response": r["answer"]} for r in recs])
    # an easy preference (every rejected response is "999"), so a tiny model's margin moves fast
    write_jsonl(d / "pairs.jsonl", [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": "999"}
                                    for r in recs])
    return d, model


def _base(d, model, alg, layout, **extra):
    tp, pp = layout
    calls = {name: {"model": m, "tp": tp, "pp": pp} for name, m in {
        "ppo": {"actor_gen": "actor", "actor_train": "actor", "ref_inf": "ref",
                "critic_inf": "critic", "critic_train": "critic"},
        "grpo": {"actor_gen": "actor", "actor_train": "actor", "ref_inf": "ref"},
        "dpo": {"actor_gen": "actor", "actor_train": "actor", "ref_inf": "ref"},
        "sft": {"actor_train": "actor"},
        "rm": {"rm_train": "reward"}}[alg].items()}
    models = {"actor": {"path": model, "optim": {"lr": 3e-3}}, "ref": {"path": model},
              "critic": {"path": model, "optim": {"lr": 3e-3}}}
    if alg == "rm":
        models = {"reward": {"path": model, "optim": {"lr": 3e-3}}}
    keep = {"ppo": ("actor", "ref", "critic"), "grpo": ("actor", "ref"), "dpo": ("actor", "ref"),
            "sft": ("actor",), "rm": ("reward",)}[alg]
    base = dict(algorithm=alg, seed=7, run_dir=str(d / f"{alg}-{tp}-{pp}"),
                models={k: v for k, v in models.items() if k in keep}, calls=calls,
                data={"train": str(d / "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
                reward={"verifier": "tests.engine.runtime.toy_rewards:sevens"},
                generation={"max_new_tokens": 4, "top_k": 0},
                logging={"progress": False, "tensorboard": False}, save_hf=False)
    for k, v in extra.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return base


def _run(base):
    import torch.distributed as dist
    result = run_config(load_run_config(None, [], base=base))
    return result if dist.get_rank() == 0 else None


def _moved(run_dir, metric, phase="train"):
    rows = [r for r in read_metrics(run_dir) if r["phase"] == phase and r.get(metric) is not None]
    vals = [r[metric] for r in rows]
    assert len(vals) >= 10, f"{metric}: only {len(vals)} steps logged"
    return sum(vals[:5]) / 5, sum(vals[-5:]) / 5


def test_ppo_at_tp2_raises_reward(dist_pool, workdir):
    d, model = workdir
    base = _base(d, model, "ppo", (2, 1), ppo={"iterations": 12, "batch_size": 16, "minibatches": 2,
                                                 "kl_coef": 0.01})
    dist_pool(2).run(_run, base)
    first, last = _moved(base["run_dir"], "score")
    assert last > first + 0.1, (first, last)


def test_grpo_at_pp2_raises_reward(dist_pool, workdir):
    d, model = workdir
    base = _base(d, model, "grpo", (1, 2), grpo={"iterations": 12, "batch_size": 4, "group_size": 4,
                                                   "minibatches": 2})
    dist_pool(2).run(_run, base)
    first, last = _moved(base["run_dir"], "score")
    assert last > first + 0.1, (first, last)


def test_dpo_at_tp2_raises_margin(dist_pool, workdir):
    d, model = workdir
    base = _base(d, model, "dpo", (2, 1), data={"train": str(d / "pairs.jsonl")},
                 dpo={"batch_size": 16, "epochs": 3, "beta": 0.1}, reward={"verifier": None})
    base["models"]["actor"]["optim"]["lr"] = 3e-3
    dist_pool(2).run(_run, base)
    first, last = _moved(base["run_dir"], "rewards_margin")
    assert last > first + 0.05, (first, last)


def test_sft_at_pp2_and_rm_at_tp2_learn(dist_pool, workdir):
    d, model = workdir
    sft = _base(d, model, "sft", (1, 2), data={"train": str(d / "sft.jsonl")},
                sft={"batch_size": 16, "steps": 12})
    dist_pool(2).run(_run, sft)
    first, last = _moved(sft["run_dir"], "loss")
    assert last < first - 0.3, (first, last)
    rm = _base(d, model, "rm", (2, 1), data={"train": str(d / "pairs.jsonl")},
               rm={"batch_size": 16, "epochs": 1}, reward={"verifier": None})
    dist_pool(2).run(_run, rm)
    first, last = _moved(rm["run_dir"], "loss")
    assert last < first, (first, last)


def test_config_errors_are_one_line(workdir):
    from meshrl.engine.runtime.config import RunConfigError
    d, model = workdir
    base = _base(d, model, "ppo", (1, 1))
    with pytest.raises(RunConfigError, match="calls.actor_gen.model=nope: no such model"):
        load_run_config(None, ["calls.actor_gen.model=nope"], base=base)
    with pytest.raises(RunConfigError, match="ppo.batch_size=10 is not divisible by ppo.minibatches=4"):
        load_run_config(None, ["ppo.batch_size=10", "ppo.minibatches=4"], base=base)
    with pytest.raises(RunConfigError, match="algorithm=xyz"):
        load_run_config(None, ["algorithm=xyz"], base=base)
    with pytest.raises(RunConfigError, match="ppo.kl_coef"):
        load_run_config(None, ["ppo.kl_coef=abc"], base=base)
    # values out of range are refused before anything loads, naming the key and the bound
    for override, message in [
            ("models.actor.optim.lr=-0.1", "models.actor.optim.lr=-0.1: must not be negative"),
            ("ppo.minibatches=0", "ppo.minibatches=0: must be at least 1"),
            ("sft.steps=-3", "sft.steps=-3: must be at least 1"),
            ("calls.actor_train.tp=0", "calls.actor_train.tp=0: must be at least 1"),
            ("logging.save_every=-1", "logging.save_every=-1: must not be negative"),
            ("generation.top_k=-5", "generation.top_k=-5: must not be negative"),
            ("generation.temperature=0", "generation.temperature=0.0: must be greater than 0"),
            ("generation.top_p=1.5", r"generation.top_p=1.5: must lie in \(0, 1\]"),
            ("grpo.group_size=0", "grpo.group_size=0: must be at least 1"),
            ("ppo.kl_estimator=k4", "ppo.kl_estimator=k4: use one of k1, k2, k3"),
            ("models.critic.optim.schedule=cosin", "schedule=cosin: use one of constant, cosine, linear"),
            ("dpo.loss_type=hinge", "dpo.loss_type=hinge: use one of sigmoid, ipo")]:
        with pytest.raises(RunConfigError, match=message):
            load_run_config(None, [override], base=base)
    with pytest.raises(RunConfigError, match="reward: both model=critic and verifier=.* are set"):
        load_run_config(None, ["reward.model=critic"], base=base)
    with pytest.raises(RunConfigError, match="data.safety_filter=dual_safe: ppo reads no preference "
                                             "pairs, so it would be ignored"):
        load_run_config(None, ["data.safety_filter=dual_safe"], base=base)
    from meshrl.engine.runtime.models import complete_calls
    typo = load_run_config(None, ["calls.actor_trian.model=actor"], base=base)
    with pytest.raises(RunConfigError, match="calls.actor_trian: ppo runs no such call; did you mean "
                                             "actor_train"):
        complete_calls(typo, 1)
    assert os.path.exists(model) and json.load(open(os.path.join(model, "config.json")))


def test_models_that_cannot_read_the_data_are_refused_before_training(workdir):
    from meshrl.engine.runtime.config import RunConfigError
    d, model = workdir
    ctx_len = json.load(open(os.path.join(model, "config.json")))["max_position_embeddings"]
    sft = _base(d, model, "sft", (1, 1), data={"train": str(d / "sft.jsonl"), "max_len": ctx_len + 1},
                sft={"batch_size": 16, "steps": 2})
    with pytest.raises(RunConfigError, match=f"data.max_len = {ctx_len + 1} passes models.actor's context "
                                             f"of {ctx_len}"):
        run_config(load_run_config(None, [], base=sft))
    ppo = _base(d, model, "ppo", (1, 1), ppo={"iterations": 1, "batch_size": 16, "minibatches": 2})
    ppo["models"]["critic"] = {"scratch": dict(TINY, vocab_size=8), "optim": {"lr": 1e-3}}
    with pytest.raises(RunConfigError, match="models.critic: its vocabulary of 8 is smaller than "
                                             "models.actor's"):
        run_config(load_run_config(None, [], base=ppo))
    assert not os.path.exists(os.path.join(ppo["run_dir"], "checkpoints"))
