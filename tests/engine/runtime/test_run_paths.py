"""Run-level tests of paths the algorithm tests do not reach: iterative DPO's reference refresh, the
code verifier inside a run, a NaN reward, held-out evaluation, and a 2-rank PPO run whose actor
generates in another layout than it trains. Each checks a number the path must produce."""
import math
import os

import pytest

from meshrl.engine.data.datasets import load_prompts
from meshrl.engine.data.jsonl import DataError, read_jsonl, write_jsonl
from meshrl.engine.data.tokenizer import load_tokenizer
from meshrl.engine.generation import generate
from meshrl.engine.model import build_stage
from meshrl.engine.runtime.config import load_run_config
from meshrl.engine.runtime.metrics import read_metrics
from meshrl.engine.runtime.run import run_config
from meshrl.engine.generation.sampling import SamplingParams
from meshrl.engine.tasks import make_dataset
from meshrl.parallel.layout import ParallelLayout
from meshrl.study.setup import init_scratch_model

from tests.engine.runtime.tiny import SEVENS, TINY
from tests.engine.runtime.toy_rewards import sevens



@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run_paths")
    # std 0.2: next-token distributions far from uniform (greedy decoding has no near-ties, and a
    # weight update moves log-probs measurably)
    model = init_scratch_model(str(d / "sharp"), seed=3, overrides=TINY, std=0.2)
    recs = make_dataset(64, seed=5, digits=(1, 2))
    write_jsonl(d / "prompts.jsonl", recs)
    write_jsonl(d / "eval.jsonl", make_dataset(8, seed=9, digits=(1, 2)))
    # code tasks whose one test expects no output: a completion passes when it is a Python program
    # that runs silently, which a tiny model's digits, '+', '-' and '=' sometimes are
    write_jsonl(d / "code.jsonl", [{"question": r["prompt"], "input_output": {"inputs": [""],
                                                                              "outputs": [""]}}
                                   for r in recs])
    return d, model


def _config(d, model, alg, name, **extra):
    models = {"actor": {"path": model, "optim": {"lr": 3e-3}}, "ref": {"path": model}}
    if alg == "ppo":
        models["critic"] = {"path": model, "optim": {"lr": 3e-3}}
    base = dict(algorithm=alg, seed=7, run_dir=str(d / name), save_hf=False, models=models,
                data={"train": str(d / "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
                reward={"verifier": SEVENS}, generation={"max_new_tokens": 4, "top_k": 0},
                logging={"progress": False, "tensorboard": False})
    for k, v in extra.items():
        base[k] = {**base[k], **v} if isinstance(base.get(k), dict) else v
    return base


def _grpo(d, model, name, **extra):
    grpo = {"iterations": 1, "batch_size": 4, "group_size": 4, "minibatches": 1, **extra.pop("grpo", {})}
    return _config(d, model, "grpo", name, grpo=grpo, **extra)


def _rows(run_dir, phase="train"):
    return [r for r in read_metrics(run_dir) if r["phase"] == phase]


# ---- iterative DPO --------------------------------------------------------------------------------
def test_iterative_dpo_refreshes_the_reference_each_round(workdir):
    """Each round's pairs fit one batch, so its one step is taken where the round starts. There the
    reference must equal the actor (round 0: both the init model; later rounds: the refreshed ref),
    so the implicit-reward margin is 0 and the loss log 2 in every round, although the actor moves.
    A reference left at the init model gives round 1 and 2 a non-zero margin."""
    from safetensors.torch import load_file
    d, model = workdir
    base = _config(d, model, "dpo", "dpo_iter", save_hf=True,
                   dpo={"rounds": 3, "samples_per_prompt": 4, "prompts_per_round": 8, "batch_size": 8,
                        "epochs": 1, "beta": 0.1})
    run_config(load_run_config(None, [], base=base))
    rows = _rows(base["run_dir"])
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["pairs"] >= 1, r
        # the same weights through the inference and the training forward: equal to fp32 rounding
        assert abs(r["rewards_margin"]) < 1e-5, (r["step"], r["rewards_margin"])
        assert abs(r["loss"] - math.log(2)) < 1e-5, (r["step"], r["loss"])
    init = load_file(os.path.join(model, "model-00001-of-00001.safetensors"))
    actor = load_file(os.path.join(base["run_dir"], "hf", "actor", "model-00001-of-00001.safetensors"))
    moved = max((actor[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3, moved  # the actor trained, so a stale reference would show


# ---- the code verifier inside a run ---------------------------------------------------------------
def _runs_silently(completion: str) -> float:
    """The test's expected output is empty: a completion of digits, '+', '-' and '=' passes iff it
    compiles (such a program cannot fail at run time nor print)."""
    assert set(completion) <= set("0123456789+-="), completion
    try:
        compile(completion, "solution.py", "exec")
    except SyntaxError:
        return 0.0
    return 1.0


def test_code_verifier_scores_samples_through_the_sandbox(workdir):
    d, model = workdir
    base = _grpo(d, model, "code", data={"train": str(d / "code.jsonl")}, reward={"verifier": "code"},
                 logging={"dump_rollouts": 16})
    run_config(load_run_config(None, [], base=base))
    row = _rows(base["run_dir"])[0]
    samples = [rec for _, rec in read_jsonl(os.path.join(base["run_dir"], "rollouts", "step_0.jsonl"))]
    assert len(samples) == 16
    want = [_runs_silently(s["completion"]) for s in samples]
    assert [s["score"] for s in samples] == want, [(s["completion"], s["score"]) for s in samples]
    assert 0 < sum(want) < len(want), want  # both outcomes occur
    assert abs(row["score"] - sum(want) / 16) < 1e-6 and abs(row["pass_rate"] - sum(want) / 16) < 1e-6


# ---- a NaN reward ---------------------------------------------------------------------------------
def test_nan_reward_stops_the_run_and_keeps_what_was_saved(workdir):
    d, model = workdir
    source = "tests.engine.runtime.nan_rewards:NanAtCall"
    base = _grpo(d, model, "nan", grpo={"iterations": 3}, logging={"save_every": 1},
                 reward={"verifier": source, "verifier_args": {"nan_at": 2}})
    with pytest.raises(DataError) as err:
        run_config(load_run_config(None, [], base=base))
    msg = str(err.value)
    assert "\n" not in msg and source in msg and "sample 1" in msg and "nan" in msg, msg
    ckpts = os.path.join(base["run_dir"], "checkpoints")
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step_1"
    assert os.path.isfile(os.path.join(ckpts, "step_1", "host_state.json"))
    first = _rows(base["run_dir"])
    assert [r["step"] for r in first] == [0]
    # the saved step is resumed from, not redone: the step-0 line is the one logged before the error
    base["reward"]["verifier_args"] = {"nan_at": 0}
    run_config(load_run_config(None, [], base=base))
    rows = _rows(base["run_dir"])
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0] == first[0]


# ---- held-out evaluation --------------------------------------------------------------------------
def _greedy_pass_rate(model_dir, eval_path, max_new_tokens):
    tok = load_tokenizer(model_dir)
    prompts = [p.prompt_ids for p in load_prompts(eval_path, tok, max_prompt_len=12)]
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=model_dir)
    out = generate(stage, prompts, SamplingParams(max_new_tokens=max_new_tokens, greedy=True,
                                                  eos_ids=[tok.eos_token_id]))
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in out.output_ids]
    return sum(sevens(None, texts)) / len(texts)


def test_held_out_evaluation_rows(workdir):
    """eval_every=2 over 3 iterations: evaluations after steps 2 and 3 (the end). The last one is
    the verifier's mean score of the final actor's greedy samples on the held-out prompts."""
    d, model = workdir
    base = _grpo(d, model, "eval", grpo={"iterations": 3}, save_hf=True,
                 data={"eval": str(d / "eval.jsonl")}, logging={"eval_every": 2})
    result = run_config(load_run_config(None, [], base=base))
    rows = _rows(base["run_dir"], "eval")
    assert [r["step"] for r in rows] == [2, 3], rows
    assert all(0.0 <= r["pass_rate"] <= 1.0 for r in rows)
    want = _greedy_pass_rate(os.path.join(base["run_dir"], "hf", "actor"), d / "eval.jsonl", 4)
    assert abs(rows[-1]["pass_rate"] - want) < 1e-6, (rows[-1]["pass_rate"], want)
    assert result == {"pass_rate": rows[-1]["pass_rate"]}


# ---- 2 ranks: generation in another layout than training ------------------------------------------
def _run_on_rank(base):
    import torch.distributed as dist
    run_config(load_run_config(None, [], base=base))
    return dist.get_rank()


def test_generation_view_follows_the_actor(dist_pool, workdir):
    """actor_gen at tp1·dp2 is a view of the actor trained at tp2: refreshed after every update,
    its sampling log-probs equal actor_train's recomputed old log-probs (fp32, tp1 vs tp2 sums:
    ~1e-7) on every step. A view left at the first step's weights is off by the update."""
    d, model = workdir
    tp2 = {"tp": 2, "pp": 1}
    base = _config(d, model, "ppo", "gen_view", ppo={"iterations": 3, "batch_size": 8, "minibatches": 2},
                   calls={"actor_gen": {"model": "actor", "tp": 1, "pp": 1},
                          "actor_train": {"model": "actor", **tp2}, "ref_inf": {"model": "ref", **tp2},
                          "critic_inf": {"model": "critic", **tp2},
                          "critic_train": {"model": "critic", **tp2}})
    assert dist_pool(2).run(_run_on_rank, base) == [0, 1]
    rows = _rows(base["run_dir"])
    assert [r["step"] for r in rows] == [0, 1, 2]
    gaps = [r["gen_train_logp_gap"] for r in rows]
    assert all(g <= 1e-5 for g in gaps), gaps
    assert rows[-1]["kl_seq"] > 1e-3, rows[-1]["kl_seq"]  # the actor moved from its start
