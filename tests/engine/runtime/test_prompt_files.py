"""Prompt files are read in the verifier's terms and checked by it at load, with file and line; held-out
data is loaded before the first step, so a bad eval file costs no training."""
import json
import string
import types

import pytest

from meshrl.engine.data.jsonl import DataError
from meshrl.engine.runtime.loop import load_prompt_file, run_loop
from meshrl.engine.tasks.arithmetic import ArithmeticVerifier
from meshrl.engine.tasks.char_tokenizer import CharTokenizer
from meshrl.engine.tasks.code import CodeVerifier

TOK = CharTokenizer(string.ascii_letters + string.digits + " .,?!:'\n+-=()")


def _ctx(verifier):
    data = types.SimpleNamespace(max_prompt_len=64, chat_template=False, eval="eval.jsonl", eval_samples=8,
                                 too_long="error")
    return types.SimpleNamespace(cfg=types.SimpleNamespace(data=data), tokenizer=TOK, verifier=verifier,
                                 main=False)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_code_tasks_prompt_with_their_question(tmp_path):
    io = {"inputs": ["1\n"], "outputs": ["2\n"]}
    path = _write(tmp_path / "code.jsonl", [{"question": "Add one.", "input_output": io}])
    (p,) = load_prompt_file(_ctx(CodeVerifier()), path)
    assert p.prompt_ids == TOK("Add one.")["input_ids"] and p.record["input_output"] == io
    bad = _write(tmp_path / "bad.jsonl", [{"question": "Add one.", "input_output": io},
                                          {"question": "No tests."}])
    with pytest.raises(DataError, match="bad.jsonl:2: code task: record has no 'input_output' field"):
        load_prompt_file(_ctx(CodeVerifier()), bad)


def test_arithmetic_records_need_their_answer_at_load(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}])
    with pytest.raises(DataError, match="p.jsonl:2: missing field 'answer'"):
        load_prompt_file(_ctx(ArithmeticVerifier()), path)
    assert len(load_prompt_file(_ctx(None), path)) == 2  # no verifier, nothing to check


def test_held_out_data_loads_before_the_first_step(tmp_path):
    steps = []

    def eval_data():
        raise DataError("eval.jsonl:3: missing field 'response'")
    ctx = types.SimpleNamespace(start_step=0, host_state={}, cfg=types.SimpleNamespace(
        run_dir=str(tmp_path), data=types.SimpleNamespace(eval="eval.jsonl"), logging=None))
    with pytest.raises(DataError, match="eval.jsonl:3"):
        run_loop(ctx, 4, steps.append, desc="sft", limit_key="sft.steps", eval_fn=lambda s: {},
                 eval_data=eval_data)
    assert steps == []


def test_the_data_is_tokenized_for_the_actor_whatever_the_model_order(monkeypatch):
    from meshrl.engine.runtime import context
    monkeypatch.setattr(context, "load_tokenizer", lambda path: f"tokenizer of {path}")
    model = lambda name: types.SimpleNamespace(name=name, source_dir=f"/models/{name}")  # noqa: E731
    models = {n: model(n) for n in ("reward", "critic", "actor")}
    fake = types.SimpleNamespace(executor=types.SimpleNamespace(models=models),
                                 cfg=types.SimpleNamespace(extra={}))
    assert context.RunContext._tokenizer(fake) == "tokenizer of /models/actor"
    del models["actor"]
    assert context.RunContext._tokenizer(fake) == "tokenizer of /models/reward"


def test_dropped_records_are_reported_and_none_left_is_an_error(tmp_path, capsys):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "1+1="}, {"prompt": "1+1=" * 30}])
    ctx = _ctx(None)
    ctx.cfg.data.too_long, ctx.main = "skip", True
    assert len(load_prompt_file(ctx, path)) == 1
    assert "data: " + path + ": kept 1 of 2 records (dropped 1 too_long)" in capsys.readouterr().out
    only_long = _write(tmp_path / "long.jsonl", [{"prompt": "1+1=" * 30}])
    with pytest.raises(DataError, match="kept 0 of 1 records \\(dropped 1 too_long\\): no records left"):
        load_prompt_file(ctx, only_long)


def test_held_out_prompts_are_scored_by_the_verifier_else_the_reward_model():
    from meshrl.engine.runtime.loop import held_out_metric

    def ctx(alg, verifier, reward_model):
        return types.SimpleNamespace(verifier=verifier, cfg=types.SimpleNamespace(
            algorithm=alg, reward=types.SimpleNamespace(model=reward_model)))
    assert held_out_metric(ctx("ppo", ArithmeticVerifier(), None)) == "pass_rate"
    assert held_out_metric(ctx("grpo", None, "reward")) == "score"
    assert held_out_metric(ctx("dpo", None, "reward")) is None  # DPO's held-out data are pairs
    assert held_out_metric(ctx("ppo", None, None)) is None
