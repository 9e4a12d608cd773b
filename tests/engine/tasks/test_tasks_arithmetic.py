import json
import re

import pytest

from meshrl.engine.tasks import (CharTokenizer, get_verifier, make_dataset, make_splits, make_tokenizer,
                                 score, split_records)
from meshrl.engine.data.jsonl import DataError, read_jsonl, write_jsonl
from meshrl.engine.tasks.arithmetic import extract_answer

_PROBLEM = re.compile(r"^(\d+)([+-])(\d+)=$")


def _check_record(rec):
    a, op, b = _PROBLEM.match(rec["prompt"]).groups()
    want = int(a) + int(b) if op == "+" else int(a) - int(b)
    assert rec["answer"] == str(want), rec
    return a, op, b


def test_generation_is_deterministic_and_correct():
    first = make_dataset(200, seed=7, digits=(1, 3), ops=("+", "-"))
    assert first == make_dataset(200, seed=7, digits=(1, 3), ops=("+", "-"))
    assert first != make_dataset(200, seed=8, digits=(1, 3), ops=("+", "-"))
    assert len({r["prompt"] for r in first}) == 200
    ops_seen = set()
    for rec in first:
        a, op, b = _check_record(rec)
        ops_seen.add(op)
        assert 1 <= len(a) <= 3 and 1 <= len(b) <= 3
        assert not rec["answer"].startswith("-")  # allow_negative=False swaps operands
    assert ops_seen == {"+", "-"}


def test_digit_range_is_respected():
    for rec in make_dataset(100, seed=0, digits=(4, 5)):
        a, _, b = _check_record(rec)
        assert len(a) in (4, 5) and len(b) in (4, 5) and not a.startswith("0") and not b.startswith("0")


def test_negative_answers_when_allowed():
    recs = make_dataset(300, seed=1, ops=("-",), allow_negative=True)
    assert any(r["answer"].startswith("-") for r in recs)
    for rec in recs:
        _check_record(rec)


def test_asking_for_more_distinct_problems_than_exist_fails():
    assert len(make_dataset(100, seed=0, digits=(1, 1))) == 100  # exactly all 10 x 10 sums
    with pytest.raises(ValueError, match="at most 100"):
        make_dataset(101, seed=0, digits=(1, 1))
    with pytest.raises(ValueError, match="operator"):
        make_dataset(5, seed=0, ops=("*",))


def test_splits_do_not_overlap():
    train, test = make_splits(500, 100, seed=3, digits=(1, 2))
    assert len(train) == 500 and len(test) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert (train, test) == make_splits(500, 100, seed=3, digits=(1, 2))
    held = make_dataset(50, seed=9, digits=(1, 2), exclude=[r["prompt"] for r in train])
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}


def test_split_records_keeps_duplicates_on_one_side():
    recs = make_dataset(40, seed=2)
    recs = recs + recs[:10]  # repeated prompts, as k samples per prompt would give
    train, test = split_records(recs, n_test=8, seed=0)
    assert len({r["prompt"] for r in test}) == 8
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len(train) + len(test) == len(recs)


@pytest.mark.parametrize("completion", ["357", "357\n", "  357  ", "357</s>", "357</s><pad><pad>",
                                        "357\n12+3=15", "357<|endoftext|>", "357\t\r\n"])
def test_score_accepts_the_answer_with_trailing_text(completion):
    assert score({"prompt": "12+345=", "answer": "357"}, completion) == 1.0


@pytest.mark.parametrize("completion", ["3570", "35", "", "357+1", "-357", "358", "3 57", "</s>357"])
def test_score_rejects_wrong_answers(completion):
    assert score({"prompt": "12+345=", "answer": "357"}, completion) == 0.0


def test_extract_answer_takes_the_first_line():
    assert extract_answer("42\n7") == "42"


def test_verifier_registry_and_batch():
    verifier = get_verifier("arithmetic")
    recs = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "9-3=", "answer": "6"}]
    assert verifier(recs, ["2</s>", "5"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 records but 1"):
        verifier(recs, ["2"])
    with pytest.raises(ValueError, match="unknown verifier"):
        get_verifier("chess")


def test_jsonl_round_trip(tmp_path):
    recs = make_dataset(20, seed=4)
    path = tmp_path / "train.jsonl"
    write_jsonl(path, recs)
    assert [r for _, r in read_jsonl(path)] == recs
    assert all(json.loads(line) for line in path.read_text().splitlines())
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_tokenizer_round_trip_and_special_tokens():
    tok = make_tokenizer()
    assert len(tok) == tok.vocab_size == 16  # 3 specials + 10 digits + '+', '-', '='
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for rec in make_dataset(50, seed=5, ops=("+", "-")):
        text = rec["prompt"] + rec["answer"]
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.encode(text, add_special_tokens=False) == ids[1:]
    ids = tok.encode("1+2=3</s>", add_special_tokens=False)
    assert ids[-1] == tok.eos_token_id and len(ids) == 6
    assert tok.decode(ids) == "1+2=3</s>"
    assert tok.decode([tok.bos_token_id] + ids + [tok.pad_token_id], skip_special_tokens=True) == "1+2=3"
    assert tok.batch_decode([ids, ids[:2]], skip_special_tokens=True) == ["1+2=3", "1+"]
    assert tok("12")["input_ids"] == tok.encode("12")
    with pytest.raises(ValueError, match="'x' is not in the vocabulary"):
        tok.encode("1x2")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([99])


def test_tokenizer_save_and_load(tmp_path):
    tok = CharTokenizer("0123456789+=")
    assert not CharTokenizer.is_saved_in(tmp_path)
    tok.save_pretrained(tmp_path / "model")
    assert CharTokenizer.is_saved_in(tmp_path / "model")
    loaded = CharTokenizer.from_pretrained(tmp_path / "model")
    assert loaded.chars == tok.chars and loaded.vocab_size == 15
    assert loaded.encode("12+3=15") == tok.encode("12+3=15")
    with pytest.raises(FileNotFoundError, match="char_tokenizer.json"):
        CharTokenizer.from_pretrained(tmp_path)
    (tmp_path / "char_tokenizer.json").write_text('{"type": "bpe"}')
    with pytest.raises(ValueError, match="not a CharTokenizer file"):
        CharTokenizer.from_pretrained(tmp_path)
