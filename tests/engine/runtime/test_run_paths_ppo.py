"""Run-level tests of PPO paths that the algorithm tests do not reach, each a whole `run_config` of a
tiny model in one process, checked against a number the path must produce: a reward model's scores
(recomputed by transformers), the critic's bootstrap of truncated responses, `init_from`, optimizer
offloading, PPO epochs, and microbatch splitting under the loss-normalisation contract."""
import json
import math
import os

import pytest
import torch

from meshrl.engine.batch import split_by_tokens
from meshrl.engine.data.jsonl import read_jsonl, write_jsonl
from meshrl.engine.model import build_stage, save_hf
from meshrl.engine.runtime.config import load_run_config
from meshrl.engine.runtime.metrics import read_metrics
from meshrl.engine.runtime.run import run_config
from meshrl.engine.tasks import make_dataset
from meshrl.parallel.layout import ParallelLayout
from meshrl.study.setup import init_scratch_model

from tests.engine.runtime.tiny import SEVENS, TINY



@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo_paths")
    model = init_scratch_model(str(d / "init"), seed=3, overrides=TINY)
    sharp = init_scratch_model(str(d / "sharp"), seed=3, overrides=TINY, std=0.2)
    write_jsonl(d / "prompts.jsonl", make_dataset(64, seed=5, digits=(1, 2)))
    # a reward model: the init model with a random (not zero) score head, so its scores differ
    rm = build_stage(ParallelLayout(ranks=[0]), model_dir=model, head="value")
    with torch.no_grad():
        head = next(p for p in rm.parameters() if p.shard_spec.name == "score.weight")
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(11)) * 0.3)
    save_hf(rm, str(d / "rm"), tokenizer_dir=model)
    return d, model, sharp, str(d / "rm")


def _ppo(d, model, name, *, ppo=None, models=None, **extra):
    base = dict(algorithm="ppo", seed=7, run_dir=str(d / name), save_hf=False,
                models={"actor": {"path": model, "optim": {"lr": 1e-3}}, "ref": {"path": model},
                        "critic": {"path": model, "optim": {"lr": 1e-3}}, **(models or {})},
                data={"train": str(d / "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
                reward={"verifier": SEVENS}, generation={"max_new_tokens": 4, "top_k": 0},
                ppo={"iterations": 1, "batch_size": 8, "minibatches": 2, **(ppo or {})},
                logging={"progress": False, "tensorboard": False})
    for k, v in extra.items():
        base[k] = {**base[k], **v} if isinstance(base.get(k), dict) else v
    return base


def _train_rows(base):
    run_config(load_run_config(None, [], base=base))
    return [r for r in read_metrics(base["run_dir"]) if r["phase"] == "train"]


def _rollouts(base, step=0):
    """The dumped samples of a step (logging.dump_rollouts)."""
    return [rec for _, rec in read_jsonl(os.path.join(base["run_dir"], "rollouts", f"step_{step}.jsonl"))]


def _hf_scores(rm_dir, samples):
    """transformers' LlamaForSequenceClassification on prompt+response, one sequence at a time
    (no padding, so it reads the last token, as meshrl's reward model does)."""
    from transformers import AutoModelForSequenceClassification
    m = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    m.config.pad_token_id = None  # a sampled token may be the pad id; batch 1 needs no padding
    with torch.no_grad():
        return [m(torch.tensor([s["prompt_ids"] + s["output_ids"]])).logits[0, 0].item()
                for s in samples]


def _not_time(row):
    return {k: v for k, v in row.items() if not (k.startswith("time") or k == "step_seconds")}


# ---- reward model as PPO's reward -----------------------------------------------------------------
def test_reward_model_scores_are_the_logged_scores(workdir):
    d, model, _, rm = workdir
    base = _ppo(d, model, "rm_reward", models={"reward": {"path": rm}}, reward={"verifier": None,
                                                                                   "model": "reward"},
                logging={"dump_rollouts": 8})
    row = _train_rows(base)[0]
    samples = _rollouts(base)
    assert len(samples) == 8
    want = _hf_scores(rm, samples)
    got = [s["score"] for s in samples]
    assert max(want) - min(want) > 0.05, want  # the head is not zero: samples score differently
    # fp32 both ways, different kernels and summation orders: agreement to ~1e-6 in practice
    assert all(abs(a - b) < 1e-4 for a, b in zip(got, want)), (got, want)
    assert abs(row["score"] - sum(want) / len(want)) < 1e-4, (row["score"], want)


# ---- ppo.truncated = bootstrap ----------------------------------------------------------------------
def test_truncated_responses_bootstrap_from_the_critic(workdir):
    """kl_coef = 0 and γ = λ = 1, so each action's return is the sum of later rewards plus the
    bootstrap value: the score for a response that ended, and (bootstrap mode) the critic's value
    after the last token for a truncated one. The critic is the reward model above, whose value
    after the last token is exactly its score of the sequence, so transformers recomputes it."""
    d, model, _, rm = workdir
    runs = {}
    for mode in ("bootstrap", "score"):
        base = _ppo(d, model, f"trunc_{mode}", ppo={"truncated": mode, "kl_coef": 0.0, "batch_size": 16,
                                                    "minibatches": 1},
                    models={"critic": {"path": rm, "optim": {"lr": 1e-3}}},
                    generation={"max_new_tokens": 3}, logging={"dump_rollouts": 16})
        runs[mode] = (_train_rows(base)[0], _rollouts(base))
    (boot_row, samples), (score_row, samples_s) = runs["bootstrap"], runs["score"]
    assert [s["output_ids"] for s in samples] == [s["output_ids"] for s in samples_s]  # same draw
    ended = [s["finish_reason"] != "length" for s in samples]
    lens = [len(s["output_ids"]) for s in samples]
    scores = [s["score"] for s in samples]
    assert any(ended) and not all(ended), ended
    assert any(sc > 0 for sc, e in zip(scores, ended) if not e), "no truncated response scored > 0"
    assert abs(score_row["truncated"] - (1 - sum(ended) / 16)) < 1e-6
    n = len(samples)
    # rewards: a truncated response's score is dropped in bootstrap mode, kept in score mode
    assert abs(boot_row["reward_total"] - sum(s for s, e in zip(scores, ended) if e) / n) < 1e-5
    assert abs(score_row["reward_total"] - sum(scores) / n) < 1e-5
    assert score_row["reward_total"] > boot_row["reward_total"] + 1e-3
    # returns: the truncated responses' come from the critic's value after their last token
    values = _hf_scores(rm, samples)
    want = sum(L * (s if e else v) for L, s, e, v in zip(lens, scores, ended, values)) / sum(lens)
    assert abs(boot_row["return"] - want) < 1e-4, (boot_row["return"], want)
    want_score = sum(L * s for L, s in zip(lens, scores)) / sum(lens)
    assert abs(score_row["return"] - want_score) < 1e-5, (score_row["return"], want_score)


# ---- init_from ------------------------------------------------------------------------------------
def test_init_from_starts_with_the_other_models_weights(workdir):
    """ref and critic made from the actor: the first KL to the reference is exactly 0, and a critic
    that cannot move (lr 0) is exported with the actor's weights, plus its own (zero) value head."""
    from safetensors.torch import load_file
    d, _, sharp, _ = workdir
    base = _ppo(d, sharp, "init_from", save_hf=True,
                models={"ref": {"init_from": "actor"},
                        "critic": {"init_from": "actor", "optim": {"lr": 0.0}}},
                ppo={"minibatches": 1})
    row = _train_rows(base)[0]
    assert row["kl_seq"] == 0.0, row["kl_seq"]  # same weights, same layout: identical log-probs
    init = load_file(os.path.join(sharp, "model-00001-of-00001.safetensors"))
    critic = load_file(os.path.join(base["run_dir"], "hf", "critic", "model-00001-of-00001.safetensors"))
    assert set(critic) - set(init) == {"score.weight"} and torch.all(critic["score.weight"] == 0)
    body = [k for k in init if k in critic]
    assert len(body) >= 2 * 9, body
    for k in body:
        assert torch.equal(critic[k], init[k]), k


# ---- offload_when_idle ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline(workdir):
    """Two PPO iterations of two minibatches, every sample dumped: what the variants reproduce."""
    d, model, _, _ = workdir
    base = _ppo(d, model, "baseline", ppo={"iterations": 2}, logging={"dump_rollouts": 8})
    return base, _train_rows(base)


def test_offload_when_idle_reproduces_the_run(workdir, baseline):
    d, model, _, _ = workdir
    base = _ppo(d, model, "offload", ppo={"iterations": 2},
                models={"actor": {"path": model, "optim": {"lr": 1e-3}, "offload_when_idle": True},
                        "critic": {"path": model, "optim": {"lr": 1e-3}, "offload_when_idle": True}})
    rows = _train_rows(base)
    assert len(rows) == 2
    assert [_not_time(r) for r in rows] == [_not_time(r) for r in baseline[1]]


# ---- microbatch_tokens ----------------------------------------------------------------------------
def test_microbatch_splitting_keeps_the_metrics(workdir, baseline):
    """Minibatches of 4 sequences of 7-16 tokens in microbatches of at most 20 tokens: 2-4
    microbatches each, the same losses, KL and gradients as one microbatch (token-mean losses are
    divided by the global token count, DESIGN's loss normalisation)."""
    d, model, _, _ = workdir
    small = {"microbatch_tokens": 20}
    base = _ppo(d, model, "microbatches", ppo={"iterations": 2},
                calls={"actor_train": {"model": "actor", **small},
                       "critic_train": {"model": "critic", **small}})
    rows = _train_rows(base)
    samples = _rollouts(baseline[0])
    lengths = [len(s["prompt_ids"]) + len(s["output_ids"]) for s in samples]
    assert max(len(split_by_tokens(lengths[i:i + 4], 20)) for i in (0, 4)) >= 2, lengths
    ref = baseline[1]
    keys = ("actor/actor_loss", "actor/approx_kl", "actor/clip_frac", "actor/grad_norm",
            "critic/critic_loss", "critic/grad_norm", "score", "kl_seq", "value", "return")
    for step, (a, b) in enumerate(zip(rows, ref)):
        for k in keys:
            # fp32 sums in another order: ~1e-7 relative at step 0; the first Adam step (≈ lr·sign g)
            # carries that into step 1 only where a gradient element is ~0, so 1e-4 holds both
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (step, k, a[k], b[k])


# ---- PPO epochs -----------------------------------------------------------------------------------
def test_second_epoch_is_off_policy_and_steps_count(workdir):
    """One minibatch: epoch 1 is exactly on policy (approx-KL 0, as test_temperature shows), so a
    positive mean approx-KL over two epochs is epoch 2's, whose old log-probs are the pre-update
    ones. Optimizer steps per iteration = epochs × minibatches (checkpoint's trainer step counts)."""
    d, _, sharp, _ = workdir
    one = _ppo(d, sharp, "epochs1", ppo={"minibatches": 1, "epochs": 1},
               models={"actor": {"path": sharp, "optim": {"lr": 3e-3}}})
    two = _ppo(d, sharp, "epochs2", ppo={"minibatches": 1, "epochs": 2},
               models={"actor": {"path": sharp, "optim": {"lr": 3e-3}}})
    assert abs(_train_rows(one)[0]["actor/approx_kl"]) < 1e-9
    assert _train_rows(two)[0]["actor/approx_kl"] > 1e-6
    three = _ppo(d, sharp, "epochs3x2", ppo={"iterations": 2, "minibatches": 2, "epochs": 3})
    assert len(_train_rows(three)) == 2
    host = json.load(open(os.path.join(three["run_dir"], "checkpoints", "step_2", "host_state.json")))
    assert host["trainer_steps"] == {"actor": 2 * 3 * 2, "critic": 2 * 3 * 2}, host["trainer_steps"]
