"""Every loader reads JSONL or Parquet through `records.read_data`: a Parquet row is the record its JSONL
line would be, and errors name "file:row N"."""
import contextlib
import json
import pickle
import string
import subprocess
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meshrl.engine.data import records
from meshrl.engine.data.datasets import DataError, load_code_tasks, load_prompts, load_sft
from meshrl.engine.data.preference import load_pairs
from meshrl.engine.data.records import Row, read_data
from meshrl.engine.runtime.loop import load_prompt_file
from meshrl.engine.tasks import CharTokenizer
from meshrl.engine.tasks.arithmetic import ArithmeticVerifier

TOK = CharTokenizer(string.ascii_letters + string.digits + " .,?!:'\n+-=")

# verl's GSM8K/MATH recipe rows: chat messages in `prompt`, structs for the reward and extra info
VERL_ROW = {"data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": "1+2= Let's think step by step."}],
            "ability": "math", "reward_model": {"ground_truth": "3", "style": "rule"},
            "extra_info": {"answer": "1+2=3 #### 3", "index": 0, "question": "1+2=", "split": "train"}}


def parquet(tmp_path, rows, name="data.parquet", row_group_size=None, schema=None):
    """Rows as Hugging Face `datasets` writes them: a column per field any row has, null where a row
    lacks it (pa.Table.from_pylist would keep only the first row's fields)."""
    path = tmp_path / name
    columns = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)}
    table = pa.Table.from_pylist(rows, schema=schema) if schema else pa.Table.from_pydict(columns)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@contextlib.contextmanager
def raises(*parts):
    """Expect a one-line DataError whose message holds every part."""
    with pytest.raises(DataError) as info:
        yield info
    msg = str(info.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


def _same(a, b, fields):
    def key(xs):
        return [tuple(getattr(x, f) for f in fields) for x in xs]
    assert key(a) == key(b)


def test_prompts_with_answers_pass_to_the_arithmetic_verifier(tmp_path):
    rows = [{"prompt": "12+3=", "answer": "15"}, {"input_ids": [1, 5, 6], "answer": "7"},
            {"prompt": "2+2=", "answer": "4"}]
    path = parquet(tmp_path, rows)
    out = load_prompts(path, TOK, max_prompt_len=16)
    # a row is its JSONL line: a column null in a row (input_ids, prompt) is a field the line lacks
    assert [p.record for p in out] == rows
    _same(out, load_prompts(jsonl(tmp_path, rows), TOK, max_prompt_len=16),
          ("prompt_ids", "record", "lineno"))
    assert [p.where for p in out] == [f"{path}:row {i}" for i in (1, 2, 3)]
    assert ArithmeticVerifier()([p.record for p in out], ["15", "8", "4"]) == [1.0, 0.0, 1.0]


def test_a_missing_answer_names_the_row(tmp_path):
    path = parquet(tmp_path, [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+1=", "answer": "3"},
                              {"prompt": "2+2="}])  # the third row's answer is null
    ctx = types.SimpleNamespace(cfg=types.SimpleNamespace(data=types.SimpleNamespace(
        max_prompt_len=64, chat_template=False, too_long="error")), tokenizer=TOK,
        verifier=ArithmeticVerifier(), main=False)
    with raises(f"{path}:row 3: missing field 'answer'"):
        load_prompt_file(ctx, str(path))


def test_nested_fields_are_python_lists_and_dicts(tmp_path):
    info = {k: v for k, v in VERL_ROW["extra_info"].items() if k != "split"}
    rows = [{**VERL_ROW, "question": "1+2=", "tags": {"level": 1}},
            {**VERL_ROW, "question": "3+4=", "extra_info": {**info, "index": 1}}]
    path = parquet(tmp_path, rows)
    # the second row's null "tags" is absent, as in its JSONL line; a struct keeps every field, null or not
    assert [r for _, r in read_data(path)] == [rows[0], {**rows[1], "extra_info": {**info, "index": 1,
                                                                                   "split": None}}]
    (p, _) = load_prompts(path, TOK, max_prompt_len=16, prompt_field="question")
    assert p.record["prompt"][0]["content"] == "1+2= Let's think step by step."
    assert p.record["reward_model"]["ground_truth"] == "3" and p.prompt_ids == TOK("1+2=")["input_ids"]
    # verl's `prompt` is chat messages: they need a tokenizer with a chat template (this one has none)
    with raises(f"{path}:row 1: field 'prompt' holds chat messages but the tokenizer has no chat template"):
        load_prompts(path, TOK, max_prompt_len=16)


def test_a_map_column_is_a_dict(tmp_path):
    schema = pa.schema([("prompt", pa.string()), ("meta", pa.map_(pa.string(), pa.int64()))])
    path = parquet(tmp_path, [{"prompt": "a", "meta": [("x", 1), ("y", 2)]}], schema=schema)
    assert read_data(path) == [(1, {"prompt": "a", "meta": {"x": 1, "y": 2}})]


def test_sft_and_pairs_from_parquet_equal_jsonl(tmp_path):
    sft = [{"prompt": "Hi", "response": " there."}, {"prompt": "Q", "completion": " A"}]
    got = load_sft(parquet(tmp_path, sft, "sft.parquet"), TOK, max_len=32)
    _same(got, load_sft(jsonl(tmp_path, sft, "sft.jsonl"), TOK, max_len=32),
          ("prompt_ids", "response_ids", "record", "lineno"))
    pairs = [{"prompt": "2+2=", "chosen": "4", "rejected": "5"},
             {"prompt": "1+1=", "chosen": "2", "rejected": "3"}]
    got = load_pairs(parquet(tmp_path, pairs, "pairs.parquet"), TOK, max_len=32)
    _same(got, load_pairs(jsonl(tmp_path, pairs, "pairs.jsonl"), TOK, max_len=32),
          ("prompt_ids", "chosen_ids", "rejected_ids", "record", "lineno"))
    path = parquet(tmp_path, [*pairs, {"prompt": "3+3=", "chosen": "6"}], "bad.parquet")
    with raises(f"{path}:row 3: missing field 'rejected'"):
        load_pairs(path, TOK, max_len=32)
    path = parquet(tmp_path, [{"prompt": "Hi", "response": " a"}, {"prompt": "Q"}], "bad_sft.parquet")
    with raises(f"{path}:row 2: missing field 'response'"):
        load_sft(path, TOK, max_len=32)


def test_code_tasks_from_parquet(tmp_path):
    tasks = [{"question": "Add one.", "input_output": {"inputs": ["1\n"], "outputs": ["2\n"]}},
             {"question": "Echo.", "input_output": json.dumps({"inputs": ["x\n"], "outputs": ["x\n"]})}]
    got = load_code_tasks(parquet(tmp_path, tasks[:1], "a.parquet"))
    assert got[0].input_output == tasks[0]["input_output"] and got[0].where.endswith("a.parquet:row 1")
    got = load_code_tasks(parquet(tmp_path, tasks[1:], "b.parquet"))  # APPS keeps the tests as a JSON string
    assert got[0].input_output == {"inputs": ["x\n"], "outputs": ["x\n"]}


def test_rows_are_numbered_across_batches_and_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "_BATCH_ROWS", 2)
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(7)]
    got = read_data(parquet(tmp_path, rows, row_group_size=3))
    assert [(n, r) for n, r in got] == list(enumerate(rows, 1))
    assert all(type(n) is Row for n, _ in got) and f"f:{got[4][0]}" == "f:row 5"


def test_a_row_number_pickles_as_a_row():  # records and their places travel to verifier processes
    n = pickle.loads(pickle.dumps(Row(3)))
    assert type(n) is Row and n == 3 and str(n) == "row 3" and f"{n:>3}" == "  3"


def test_format_by_extension_and_one_line_errors(tmp_path):
    rows = [{"prompt": "a"}]
    assert read_data(jsonl(tmp_path, rows, "x.json")) == [(1, {"prompt": "a"})]
    assert read_data(parquet(tmp_path, rows, "X.PARQUET")) == [(1, {"prompt": "a"})]
    bad = tmp_path / "data.csv"
    bad.write_text("prompt\na\n")
    with raises(f"{bad}: unknown data file type '.csv'", ".jsonl, .json or .parquet"):
        load_prompts(bad, TOK, max_prompt_len=8)
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text('{"prompt": "a"}\n')
    with raises(f"{not_parquet}: cannot read it as Parquet"):
        read_data(not_parquet)
    with raises(f"{tmp_path / 'none.parquet'}: no such file"):
        read_data(tmp_path / "none.parquet")
    empty = parquet(tmp_path, [], "empty.parquet", schema=pa.schema([("prompt", pa.string())]))
    with raises(f"{empty}: no records: the file is empty"):
        load_prompts(empty, TOK, max_prompt_len=8)


def test_columns_json_cannot_hold_are_refused(tmp_path):
    schema = pa.schema([("prompt", pa.string()), ("meta", pa.struct([("blob", pa.binary())]))])
    path = parquet(tmp_path, [{"prompt": "a", "meta": {"blob": b"\x00"}}], schema=schema)
    with raises(f"{path}: column 'meta' is struct<blob: binary>", "cast it to a string or number"):
        read_data(path)


def test_parquet_without_pyarrow_is_a_one_line_error(tmp_path, monkeypatch):
    path = parquet(tmp_path, [{"prompt": "a"}])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with raises(f"{path}: reading Parquet needs pyarrow", "pip install 'meshrl[parquet]'"):
        load_prompts(path, TOK, max_prompt_len=8)
    assert load_prompts(jsonl(tmp_path, [{"prompt": "a"}]), TOK, max_prompt_len=8)  # JSONL needs none


def test_no_loader_imports_pyarrow_until_a_parquet_file_is_read():
    code = ("import sys, meshrl.engine.data.datasets, meshrl.engine.data.preference, "
            "meshrl.engine.generation.job, meshrl.engine.runtime.loop; print('pyarrow' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]
