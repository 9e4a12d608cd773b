"""`meshrl generate` end to end: one process and torchrun at tp=2, pp=2 (and for mixture-of-experts
models at ep=2, tp2·ep2 and ep4 with a replica given no prompt), with bad input errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from meshrl.testing.tiny_models import make_tiny_hf

ENV = dict(os.environ, OMP_NUM_THREADS="1", MESHRL_DEVICE="cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = make_tiny_hf("llama", str(d / "model"), seed=3)
    prompts = d / "prompts.jsonl"
    rows = [{"input_ids": [3, 4, 5], "id": "a"}, {"input_ids": [9, 8, 7, 6, 5, 4], "id": "b"},
            {"input_ids": [11], "id": "c"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d, model, prompts, rows


def _run(args, nproc=1):
    if nproc == 1:
        cmd = [sys.executable, "-m", "meshrl.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--standalone", "-m", "meshrl.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


RUNS = {"dense": [(1, []), (1, ["--engine", "fast"]), (4, ["--tp", "2", "--pp", "2"])],
        "moe": [(1, ["--engine", "fast"]), (2, ["--ep", "2"]), (4, ["--tp", "2", "--ep", "2"]),
                (4, ["--ep", "4", "--engine", "fast"])]}


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen3_moe", "mixtral"])
def test_greedy_cli_matches_transformers_single_and_tp2_pp2(setup, kind):
    import transformers
    d, model, prompts, rows = setup
    if kind != "llama":
        model = make_tiny_hf(kind, str(d / kind), seed=3)
        d = d / kind
    m = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    ref, ref_logps = [], []
    for r in rows:
        ids = r["input_ids"]
        g = m.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=2,
                       pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        ref.append(g.sequences[0, len(ids):].tolist())
        logits = torch.cat(g.logits)
        top2 = logits.topk(2, -1).values
        # no near-tie for fp32 differences to flip (smallest gap measured: 2.3e-2; see tests/engine/generation/test_reference.py)
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, top2
        ref_logps.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(ref[-1])[:, None])[:, 0])
    for nproc, extra in RUNS["moe" if kind in ("qwen3_moe", "mixtral") else "dense"]:
        out = d / f"out{nproc}{''.join(extra)}.jsonl"
        r = _run(["generate", "--model", model, "--prompts", str(prompts), "--out", str(out),
                  "--greedy", "--max-new-tokens", "8", *extra], nproc)
        assert r.returncode == 0, r.stderr[-3000:]
        got = [json.loads(line) for line in out.read_text().splitlines()]
        assert [g["id"] for g in got] == ["a", "b", "c"]  # order and pass-through fields kept
        assert [g["output_ids"] for g in got] == ref
        assert all(len(g["logprobs"]) == len(g["output_ids"]) for g in got)
        # --greedy reports log-probs at T=1, equal to transformers' log_softmax: fp32 on both
        # sides, measured max |diff| 4.1e-6 (one process), 2.9e-6 (fast engine), 3.1e-6 (tp2·pp2)
        for g, want in zip(got, ref_logps):
            err = (torch.tensor(g["logprobs"]) - want).abs().max().item()
            assert err <= 1e-5, (nproc, extra, err)
        assert all(g["finish_reason"] in ("eos", "length") for g in got)


@pytest.mark.parametrize("line,needle", [
    ("{not json", "prompts.jsonl:2: not valid JSON"),
    ('{"text": "x"}', "prompts.jsonl:2: missing field 'prompt'"),
    ('{"input_ids": [1, 100000]}', "outside the vocabulary"),
])
def test_bad_jsonl_is_one_line_error(setup, tmp_path, line, needle):
    _, model, _, _ = setup
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n' + line + "\n")
    r = _run(["generate", "--model", model, "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl"),
              "--greedy", "--max-new-tokens", "2"])
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--top-k", "-3"], "top_k=-3: must not be negative"),
    (["--batch-size", "0"], "--batch-size=0: must be at least 1"),
    (["--tp", "0"], "--tp=0: must be at least 1"),
    (["--stop-ids", "99999"], "--stop-ids [99999]: outside the vocabulary"),
    (["--max-new-tokens", "100000"], "prompts.jsonl:1: the prompt's 3 tokens and --max-new-tokens=100000 "
                                     "pass the model's context"),
])
def test_bad_flags_are_one_line_errors(setup, tmp_path, flags, needle):
    _, model, prompts, _ = setup
    r = _run(["generate", "--model", model, "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
              "--max-new-tokens", "2", *flags])
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_parquet_prompts_generate_as_jsonl_ones_and_keep_nested_fields(setup, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    _, model, prompts, rows = setup
    nested = [{**r, "meta": {"tags": ["x", "y"], "n": i}, "messages": [{"role": "user", "content": "hi"}]}
              for i, r in enumerate(rows)]
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(nested), path)
    got = {}
    for name, src in (("jsonl", prompts), ("parquet", path)):
        out = tmp_path / f"{name}.jsonl"
        r = _run(["generate", "--model", model, "--prompts", str(src), "--out", str(out), "--greedy",
                  "--max-new-tokens", "4"])
        assert r.returncode == 0, r.stderr[-3000:]
        got[name] = [json.loads(line) for line in out.read_text().splitlines()]
    extra = ("meta", "messages")  # nested values come back as the JSON they were written from
    assert [{k: v for k, v in g.items() if k not in extra} for g in got["parquet"]] == got["jsonl"]
    assert [{k: g[k] for k in extra} for g in got["parquet"]] == [{k: n[k] for k in extra} for n in nested]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"input_ids": [1, 2], "id": "a"}, {"input_ids": None, "id": "b"}]),
                   bad)
    r = _run(["generate", "--model", model, "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl"),
              "--max-new-tokens", "2"])
    assert r.returncode == 2 and not (tmp_path / "o.jsonl").exists()
    assert f"{bad}:row 2: missing field 'prompt'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr
