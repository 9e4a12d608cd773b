import contextlib
import json
import math
import string

import pytest
import torch

from meshrl.engine.data.datasets import (CodeTask, DataError, PromptExample, SFTExample, check_reward,
                                         load_code_tasks, load_prompts, load_sft)
from meshrl.engine.data.preference import PairExample, filter_pairs_by_margin, load_pairs
from meshrl.engine.data.tokenizer import load_tokenizer
from meshrl.engine.tasks import CharTokenizer

TOK = CharTokenizer(string.ascii_letters + string.digits + " .,?!:'\n+-=")
EOS = TOK.eos_token_id


def write(tmp_path, lines, name="data.jsonl"):
    """Lines are dicts (dumped) or raw strings (written as is, e.g. a blank line)."""
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


@contextlib.contextmanager
def raises(*parts, exc=DataError):
    """Expect a one-line error whose message holds every part."""
    with pytest.raises(exc) as info:
        yield info
    msg = str(info.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


# ---- prompts ----

def test_prompts_text_ids_and_passthrough(tmp_path):
    path = write(tmp_path, [{"prompt": "12+3=", "answer": "15"}, "", {"input_ids": [1, 5, 6], "id": 7}])
    out = load_prompts(path, TOK, max_prompt_len=8)
    assert [type(x) for x in out] == [PromptExample, PromptExample]
    assert out[0].prompt_ids == TOK.encode("12+3=") and TOK.decode(out[0].prompt_ids) == "<s>12+3="
    assert out[0].record["answer"] == "15" and out[0].lineno == 1
    assert out[1].prompt_ids == [1, 5, 6] and out[1].lineno == 3 and out[1].where == f"{path}:3"
    assert out.report.read == 2 and out.report.kept == 2


def test_prompts_field_for_code_questions(tmp_path):
    path = write(tmp_path, [{"question": "Add 1 and 2.", "input_output": {}}])
    out = load_prompts(path, TOK, max_prompt_len=50, prompt_field="question")
    assert TOK.decode(out[0].prompt_ids, skip_special_tokens=True) == "Add 1 and 2."


def test_prompt_errors_name_file_line_field(tmp_path):
    path = write(tmp_path, [{"prompt": "1+1="}, {"text": "x"}], name="prompts.jsonl")
    with raises("prompts.jsonl:2", "missing field 'prompt'"):
        load_prompts(path, TOK, max_prompt_len=8)
    with raises("prompts.jsonl:1", "field 'prompt' is empty"):
        load_prompts(write(tmp_path, [{"prompt": "  "}], "prompts.jsonl"), TOK, max_prompt_len=8)
    with raises("prompts.jsonl:1", "field 'prompt' must be str"):
        load_prompts(write(tmp_path, [{"prompt": 3}], "prompts.jsonl"), TOK, max_prompt_len=8)
    with raises("prompts.jsonl:1", "field 'prompt'", "cannot tokenize", "'#'"):
        load_prompts(write(tmp_path, [{"prompt": "1#2"}], "prompts.jsonl"), TOK, max_prompt_len=8)
    with raises("prompts.jsonl: no records"):
        load_prompts(write(tmp_path, ["", ""], "prompts.jsonl"), TOK, max_prompt_len=8)


def test_prompt_too_long_message_and_skip(tmp_path):
    path = write(tmp_path, [{"prompt": "1+1="}, {"prompt": "123456789+1="}], name="p.jsonl")
    with raises("p.jsonl:2: field 'prompt': prompt has 13 tokens, longer than the context limit 8: "
                "shorten it or raise max_prompt_len"):
        load_prompts(path, TOK, max_prompt_len=8)
    out = load_prompts(path, TOK, max_prompt_len=8, too_long="skip")
    assert [x.lineno for x in out] == [1] and out.report.dropped == {"too_long": 1}
    assert "kept 1 of 2" in out.report.summary() and "1 too_long" in out.report.summary()


def test_prompt_input_ids_checked(tmp_path):
    for ids, part in (([1, 999], f"id 999 outside the vocabulary of {len(TOK)}"),
                      ([], "non-empty list of ints"), ([1, True], "non-empty list of ints"),
                      ("12", "non-empty list of ints")):
        with raises("ids.jsonl:1", "field 'input_ids'", part):
            load_prompts(write(tmp_path, [{"input_ids": ids}], "ids.jsonl"), TOK, max_prompt_len=8)
    path = write(tmp_path, [{"input_ids": [1, 40]}], "ids.jsonl")
    with raises("ids.jsonl:1", "id 40 outside the vocabulary of 32"):
        load_prompts(path, TOK, max_prompt_len=8, vocab_size=32)
    assert load_prompts(path, None, max_prompt_len=8)[0].prompt_ids == [1, 40]
    with raises("field 'prompt' is text but no tokenizer"):
        load_prompts(write(tmp_path, [{"prompt": "1"}]), None, max_prompt_len=8)


# ---- SFT ----

def test_sft_prompt_response_and_completion(tmp_path):
    path = write(tmp_path, [{"prompt": "1+2=", "response": "3"}, {"prompt": "2+2=", "completion": "4</s>"}])
    out = load_sft(path, TOK, max_len=10)
    assert isinstance(out[0], SFTExample)
    assert TOK.decode(out[0].prompt_ids) == "<s>1+2=" and TOK.decode(out[0].response_ids) == "3</s>"
    assert out[1].response_ids == [TOK.convert_tokens_to_ids("4"), EOS]  # an EOS in the text is not doubled


def test_sft_errors(tmp_path):
    with raises("s.jsonl:1", "field 'response' is empty"):
        load_sft(write(tmp_path, [{"prompt": "1+2=", "response": ""}], "s.jsonl"), TOK, max_len=10)
    with raises("s.jsonl:2", "missing field 'response' (or 'completion')"):
        load_sft(write(tmp_path, [{"prompt": "1=", "response": "1"}, {"prompt": "1="}], "s.jsonl"), TOK,
                 max_len=10)
    with raises("s.jsonl:1", "missing field 'prompt'"):
        load_sft(write(tmp_path, [{"response": "3"}], "s.jsonl"), TOK, max_len=10)
    with raises("s.jsonl:1: field 'response': prompt + response has 10 tokens, longer than the context "
                "limit 8: shorten it or raise max_len"):
        load_sft(write(tmp_path, [{"prompt": "12+34=", "response": "46"}], "s.jsonl"), TOK, max_len=8)
    with raises("s.jsonl:1", "cannot tell the SFT format"):
        load_sft(write(tmp_path, [{"text": "x"}], "s.jsonl"), TOK, max_len=8)


HH_CHOSEN = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Add 1+1?\n\nAssistant: It is 2."
HH_REJECTED = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Add 1+1?\n\nAssistant: No."
HH_PROMPT = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Add 1+1?\n\nAssistant:"


def test_sft_hh_trains_on_the_chosen_reply(tmp_path):
    out = load_sft(write(tmp_path, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]), TOK, max_len=200,
                   format="hh")
    assert TOK.decode(out[0].prompt_ids) == "<s>" + HH_PROMPT
    assert TOK.decode(out[0].response_ids) == " It is 2.</s>"
    auto = load_sft(write(tmp_path, [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}]), TOK, max_len=20)
    assert TOK.decode(auto[0].response_ids) == "2</s>"  # prompt + chosen read as SFT data


# ---- pairs ----

def pair(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_pairs_format(tmp_path):
    path = write(tmp_path, [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "k": 1}])
    out = load_pairs(path, TOK, max_len=10)
    p = out[0]
    assert isinstance(p, PairExample) and p.record["k"] == 1 and p.lineno == 1
    assert TOK.decode(p.prompt_ids) == "<s>1+1="
    assert TOK.decode(p.chosen_ids) == "2</s>" and TOK.decode(p.rejected_ids) == "3</s>"


def test_hh_prompt_split(tmp_path):
    out = load_pairs(write(tmp_path, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]), TOK, max_len=200)
    p = out[0]
    assert TOK.decode(p.prompt_ids) == "<s>" + HH_PROMPT
    # The leading space stays with the response: prompt + response is the dialogue.
    assert TOK.decode(p.chosen_ids) == " It is 2.</s>" and TOK.decode(p.rejected_ids) == " No.</s>"
    assert TOK.decode(p.prompt_ids + p.chosen_ids) == "<s>" + HH_CHOSEN + "</s>"


def test_hh_errors(tmp_path):
    other = HH_REJECTED.replace("Add", "Sum")
    with raises("hh.jsonl:1", "fields 'chosen' and 'rejected' differ before their last"):
        load_pairs(write(tmp_path, [{"chosen": HH_CHOSEN, "rejected": other}], "hh.jsonl"), TOK, max_len=200)
    with raises("hh.jsonl:1", "field 'rejected' has no '\\n\\nAssistant:' turn"):
        load_pairs(write(tmp_path, [{"chosen": HH_CHOSEN, "rejected": "\n\nHuman: Hi"}], "hh.jsonl"), TOK,
                   max_len=200)
    with raises("hh.jsonl:1", "field 'chosen' is empty after the last"):
        load_pairs(write(tmp_path, [{"chosen": HH_PROMPT + " ", "rejected": HH_REJECTED}], "hh.jsonl"), TOK,
                   max_len=200)
    with raises("hh.jsonl:1", "field 'chosen' ends with a Human turn"):
        load_pairs(write(tmp_path, [{"chosen": HH_CHOSEN + "\n\nHuman: ok", "rejected": HH_REJECTED}],
                         "hh.jsonl"), TOK, max_len=200)


def test_pair_errors_and_identical_skip(tmp_path):
    with raises("pr.jsonl:2", "missing field 'rejected'"):
        load_pairs(write(tmp_path, [pair("1=", "1", "2"), {"prompt": "1=", "chosen": "1"}], "pr.jsonl"), TOK,
                   max_len=10, format="pairs")
    with raises("pr.jsonl:1", "field 'chosen' is empty"):
        load_pairs(write(tmp_path, [pair("1=", "", "2")], "pr.jsonl"), TOK, max_len=10)
    with raises("pr.jsonl:1: field 'rejected': prompt + rejected (3 + 6) has 9 tokens, longer than the "
                "context limit 8"):
        load_pairs(write(tmp_path, [pair("1=", "1", "22222")], "pr.jsonl"), TOK, max_len=8)
    # a prompt with no room for a response is blamed on the prompt, not on the first response
    with raises("pr.jsonl:1: field 'prompt': the prompt with one response token has 13 tokens"):
        load_pairs(write(tmp_path, [pair("1=123456789", "1", "2")], "pr.jsonl"), TOK, max_len=8)
    with raises("pr.jsonl:1", "cannot tell the pair format"):
        load_pairs(write(tmp_path, [{"prompt": "1="}], "pr.jsonl"), TOK, max_len=8)
    path = write(tmp_path, [pair("1=", "1", "1"), pair("1=", "1", "22222"), pair("1=", "1", "2")])
    out = load_pairs(path, TOK, max_len=8, too_long="skip")
    assert [p.lineno for p in out] == [3] and out.report.dropped == {"identical": 1, "too_long": 1}
    with raises(exc=ValueError):
        load_pairs(path, TOK, max_len=8, format="dpo")


def _safe(prompt, r0, r1, better, safer, s0, s1):
    return {"prompt": prompt, "response_0": r0, "response_1": r1, "better_response_id": better,
            "safer_response_id": safer, "is_response_0_safe": s0, "is_response_1_safe": s1}


SAFE = [_safe("1=", "a", "b", 0, 1, True, True),      # dual safe
        _safe("2=", "c", "d", 1, 0, False, False),    # dual unsafe
        _safe("3=", "e", "f", 1, 1, True, False)]


def test_saferlhf_preference_and_filters(tmp_path):
    path = write(tmp_path, SAFE)
    dec = lambda ids: TOK.decode(ids, skip_special_tokens=True)  # noqa: E731
    better = load_pairs(path, TOK, max_len=10)
    assert [(dec(p.chosen_ids), dec(p.rejected_ids)) for p in better] == [("a", "b"), ("d", "c"), ("f", "e")]
    safer = load_pairs(path, TOK, max_len=10, preference="safer")
    assert [(dec(p.chosen_ids), dec(p.rejected_ids)) for p in safer] == [("b", "a"), ("c", "d"), ("f", "e")]
    out = load_pairs(path, TOK, max_len=10, safety_filter="dual_unsafe")
    assert [p.lineno for p in out] == [1, 3] and out.report.dropped == {"dual_unsafe": 1}
    out = load_pairs(path, TOK, max_len=10, safety_filter="dual_safe")
    assert [p.lineno for p in out] == [2, 3] and out.report.dropped == {"dual_safe": 1}
    assert out.report.summary().endswith("kept 2 of 3 records (dropped 1 dual_safe)")


def test_saferlhf_errors(tmp_path):
    bad = dict(SAFE[0], better_response_id=2)
    with raises("sf.jsonl:1", "field 'better_response_id' must be 0 or 1, got 2"):
        load_pairs(write(tmp_path, [bad], "sf.jsonl"), TOK, max_len=10)
    bad = {k: v for k, v in SAFE[0].items() if k != "is_response_1_safe"}
    with raises("sf.jsonl:1", "missing field 'is_response_1_safe'"):
        load_pairs(write(tmp_path, [bad], "sf.jsonl"), TOK, max_len=10, safety_filter="dual_safe")
    with raises("sf.jsonl:1", "field 'response_1' is empty"):
        load_pairs(write(tmp_path, [dict(SAFE[0], response_1=" ")], "sf.jsonl"), TOK, max_len=10)
    with raises("needs SafeRLHF records", exc=ValueError):
        load_pairs(write(tmp_path, [{"prompt": "1=", "chosen": "1", "rejected": "2"}]), TOK, max_len=10,
                   safety_filter="dual_safe")


def test_margin_filter(tmp_path):
    path = write(tmp_path, [_safe(f"{i}=", "a", "b", 0, 0, True, True) for i in range(4)], "m.jsonl")
    pairs = load_pairs(path, TOK, max_len=10)
    kept, dropped = filter_pairs_by_margin(pairs, torch.tensor([0.5, -1.0, 2.0, 0.4999]), 0.5)
    assert [p.lineno for p in kept] == [1, 3] and dropped == 2
    with raises("m.jsonl:3", "reward margin is nan"):
        filter_pairs_by_margin(pairs, [0.0, 1.0, math.nan, 1.0], 0.5)
    with raises("3 margins", exc=ValueError):
        filter_pairs_by_margin(pairs, [0.0, 1.0, 1.0], 0.5)


# ---- code tasks ----

def test_code_tasks(tmp_path):
    io = {"inputs": ["1 2\n"], "outputs": ["3\n"]}
    call = {"fn_name": "add", "inputs": [[1, 2]], "outputs": [[3]]}
    out = load_code_tasks(write(tmp_path, [{"question": "Add.", "input_output": io, "difficulty": "intro"},
                                           {"question": "Add fn.", "input_output": json.dumps(call)}]))
    assert isinstance(out[0], CodeTask) and out[0].question == "Add." and out[0].input_output == io
    assert out[0].record["difficulty"] == "intro"
    assert out[1].input_output == call and out[1].lineno == 2


def test_code_task_errors(tmp_path):
    good = {"question": "ok", "input_output": {"inputs": ["1"], "outputs": ["1"]}}
    cases = [({"input_output": good["input_output"]}, "missing field 'question'"),
             ({"question": "q"}, "missing field 'input_output'"),
             ({"question": "q", "input_output": {"inputs": ["1"], "outputs": []}},
              "'input_output' has 1 inputs but 0 outputs"),
             ({"question": "q", "input_output": "{bad"}, "'input_output' is not valid JSON"),
             ({"question": "q", "input_output": {"inputs": [3], "outputs": ["3"]}},
              "field 'input_output': inputs[0] must be a string or a list of lines"),
             ({"question": "q", "input_output": {"fn_name": 5, "inputs": [3], "outputs": [3]}},
              "'fn_name' must be a string")]
    for rec, part in cases:
        with raises("code.jsonl:2", part):
            load_code_tasks(write(tmp_path, [good, rec], "code.jsonl"))


# ---- rewards ----

def test_check_reward():
    assert check_reward(1, "x") == 1.0 and check_reward(torch.tensor(0.5), "x") == 0.5
    t = torch.tensor([1.0, 2.0])
    assert check_reward(t, "x") is t
    with raises("rm on a.jsonl:4: reward is nan, not a finite number"):
        check_reward(float("nan"), "rm on a.jsonl:4")
    with raises("batch[1]: reward is inf"):
        check_reward(torch.tensor([0.0, math.inf]), "batch")
    with raises("b.jsonl:9: reward is -inf"):
        check_reward([0.0, -math.inf], ["b.jsonl:8", "b.jsonl:9"])
    with raises("v: reward is 'x', not a number"):
        check_reward("x", "v")


# ---- a Hugging Face tokenizer, built locally ----

CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([HH_CHOSEN, HH_REJECTED, "Sure, the answer is four."] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT
    path = tmp_path_factory.mktemp("hf_tok")
    hf.save_pretrained(path)
    return load_tokenizer(str(path))


def test_hf_prompts_with_and_without_chat_template(tmp_path, hf_tok):
    path = write(tmp_path, [{"prompt": "Add 1+1?"}])
    plain = load_prompts(path, hf_tok, max_prompt_len=64)[0].prompt_ids
    assert hf_tok.decode(plain) == "<s>Add 1+1?"
    chat = load_prompts(path, hf_tok, max_prompt_len=64, chat_template=True)[0].prompt_ids
    assert hf_tok.decode(chat) == "<s><|user|>Add 1+1?\n<|assistant|>"
    with raises("has no chat template", exc=ValueError):
        load_prompts(path, TOK, max_prompt_len=64, chat_template=True)


def test_hf_hh_pairs_tokenize_the_reply_as_running_text(tmp_path, hf_tok):
    p = load_pairs(write(tmp_path, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]), hf_tok, max_len=200)[0]
    whole = hf_tok.encode(HH_CHOSEN)
    # The reply's ids are those the whole dialogue has there: " It" keeps its space inside one token.
    assert p.prompt_ids + p.chosen_ids == whole + [hf_tok.eos_token_id]
    assert hf_tok.decode(p.chosen_ids) == " It is 2.</s>" and hf_tok.decode(p.rejected_ids) == " No.</s>"


def test_hf_hh_pairs_with_chat_template(tmp_path, hf_tok):
    p = load_pairs(write(tmp_path, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]), hf_tok, max_len=200,
                   chat_template=True)[0]
    assert hf_tok.decode(p.prompt_ids) == ("<s><|user|>Hi\n<|assistant|>Hello.\n<|user|>Add 1+1?\n"
                                           "<|assistant|>")
    assert hf_tok.decode(p.chosen_ids) == "It is 2.</s>"  # HH's separator space gives way to the template's
    sft = load_sft(write(tmp_path, [{"prompt": "Add 1+1?", "response": "It is 2."}]), hf_tok, max_len=200,
                   chat_template=True)[0]
    assert hf_tok.decode(sft.prompt_ids + sft.response_ids) == \
        "<s><|user|>Add 1+1?\n<|assistant|>It is 2.</s>"


def test_chat_template_refusal_names_the_field(tmp_path, hf_tok):
    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
    dialogue = "\n\nHuman: Hi\n\nHuman: Hi\n\nAssistant: Hello."
    path = write(tmp_path, [{"chosen": dialogue, "rejected": dialogue + " No."}], "t.jsonl")
    hf_tok.chat_template, saved = strict, hf_tok.chat_template
    try:
        with raises("t.jsonl:1", "field 'chosen'", "roles must alternate"):
            load_pairs(path, hf_tok, max_len=200, chat_template=True)
    finally:
        hf_tok.chat_template = saved


def test_hf_ids_beyond_the_model_vocabulary(tmp_path, hf_tok):
    path = write(tmp_path, [{"prompt": "Hi", "response": " Sure"}], "v.jsonl")
    bound = max(hf_tok.encode("Hi")) + 1  # the prompt fits a model vocabulary this small; the reply does not
    assert max(hf_tok.encode("Hi Sure")) >= bound
    with raises("v.jsonl:1", "field 'response'", f"outside the vocabulary of {bound}"):
        load_sft(path, hf_tok, max_len=64, vocab_size=bound)
    with raises("v.jsonl:1", "field 'prompt'", "outside the vocabulary of 10"):
        load_sft(path, hf_tok, max_len=64, vocab_size=10)


def test_a_byte_order_mark_is_skipped(tmp_path):
    from meshrl.engine.data.jsonl import read_jsonl
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "b"}\n')
    assert read_jsonl(path) == [(1, {"prompt": "a"}), (2, {"prompt": "b"})]


def test_chat_message_prompts_render_with_the_chat_template(tmp_path, hf_tok):
    """verl's data files hold `prompt` as chat messages: rendered with the template and its
    generation prompt, whether or not data.chat_template is set (a system turn included)."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1+1?"}]
    path = write(tmp_path, [{"prompt": msgs, "reward_model": {"ground_truth": "2"}}])
    for chat in (False, True):
        (p,) = load_prompts(path, hf_tok, max_prompt_len=64, chat_template=chat)
        assert hf_tok.decode(p.prompt_ids) == "<s><|system|>Be brief.\n<|user|>Add 1+1?\n<|assistant|>"
        assert p.record["reward_model"] == {"ground_truth": "2"}
    with raises(f"{path}:1: field 'prompt' holds chat messages but the tokenizer has no chat template"):
        load_prompts(path, TOK, max_prompt_len=64)
    bad = write(tmp_path, [{"prompt": [{"role": "user"}]}])
    with raises(f"{bad}:1: field 'prompt' is a list, so it must be chat messages"):
        load_prompts(bad, hf_tok, max_prompt_len=64)
