"""Every log-prob that enters a ratio or a KL is taken at the sampling temperature: at T = 0.7 a
PPO or GRPO run's first minibatch is exactly on policy (ratio 1, nothing clipped, approx-KL 0), and
GRPO's KL to a reference that equals the actor is 0. Computing the current log-probs at T = 1
while the old and reference ones are at T fails every assertion here."""
import pytest

from meshrl.engine.runtime.config import load_run_config
from meshrl.engine.runtime.metrics import read_metrics
from meshrl.engine.runtime.run import run_config

from tests.engine.runtime.tiny import SEVENS, tiny_task


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    # std 0.2: distributions far from uniform, so T = 0.7 and T = 1 give very different log-probs
    return tiny_task(tmp_path_factory, "temperature", std=0.2)


def _first_train_row(d, model, alg, extra):
    models = {"actor": {"path": model, "optim": {"lr": 1e-3}}, "ref": {"path": model}}
    if alg == "ppo":
        models["critic"] = {"path": model, "optim": {"lr": 1e-3}}
    base = dict(algorithm=alg, seed=7, run_dir=str(d / alg), models=models, save_hf=False,
                data={"train": str(d / "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
                reward={"verifier": SEVENS},
                generation={"max_new_tokens": 6, "top_k": 0, "temperature": 0.7},
                logging={"progress": False, "tensorboard": False}, **extra)
    run_config(load_run_config(None, [], base=base))
    return next(r for r in read_metrics(base["run_dir"]) if r["phase"] == "train")


def test_ppo_first_minibatch_is_on_policy_at_temperature(workdir):
    d, model = workdir
    row = _first_train_row(*workdir, "ppo", {"ppo": {"iterations": 1, "batch_size": 16,
                                                      "minibatches": 1, "epochs": 1,
                                                      "entropy_coef": 0.01}})
    # one minibatch, one epoch: the update comes after every ratio is taken, so each is exactly 1
    # (fp32; the old log-probs are a forward-only pass of the same weights on the same tokens)
    assert row["actor/clip_frac"] == 0.0
    assert row["actor/ratio_out_frac"] == 0.0
    assert abs(row["actor/ratio_mean"] - 1.0) < 1e-6, row["actor/ratio_mean"]
    assert abs(row["actor/approx_kl"]) < 1e-9, row["actor/approx_kl"]
    # the generation engine's log-probs are the same numbers (both at T = 0.7)
    assert row["gen_train_logp_gap"] < 1e-5, row["gen_train_logp_gap"]


def test_grpo_first_minibatch_is_on_policy_at_temperature(workdir):
    d, model = workdir
    row = _first_train_row(*workdir, "grpo", {"grpo": {"iterations": 1, "batch_size": 4,
                                                        "group_size": 4, "minibatches": 1,
                                                        "epochs": 1}})
    assert row["actor/clip_frac"] == 0.0
    assert abs(row["actor/approx_kl"]) < 1e-9, row["actor/approx_kl"]
    # the reference is the actor's starting weights: k3 KL between equal distributions is 0
    assert abs(row["actor/kl"]) < 1e-9, row["actor/kl"]
