"""The benchmark scripts' CPU smoke runs still run: each checks its kernels against the baseline it
times and fails (non-zero exit) when they disagree."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decode_attention_benchmark_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MESHRL_BENCH_RESULTS=str(tmp_path), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_attention.py"), "--small"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = tmp_path.glob("decode_attention-small-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert len(rows) == 2 and all(r["splits"] == 2 and r["max_err"] < 1e-4 for r in rows)
    assert all(r["meshrl_s"] > 0 and r["torch_s"] > 0 for r in rows)


def test_decode_gemms_benchmark_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MESHRL_BENCH_RESULTS=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_gemms.py"), "--small"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = tmp_path.glob("decode_gemms-small-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert {r["variant"] for r in rows} == {"cublas", "cublaslt", "W @ xT"} and len(rows) == 6
    assert all(r["us_per_layer"] > 0 and r["max_err"] < 1e-3 for r in rows)


def test_gpu_check_cpu_smoke():
    """benchmarks/gpu_check.py on CPU: what needs no CUDA runs (engines' CPU paths, the kernels'
    torch paths at small sizes) and passes; every CUDA-only check says it was skipped."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")  # the CPU run, on any host
    for var in ("MESHRL_KERNELS", "TRITON_INTERPRET", "MESHRL_GENERATE"):
        env.pop(var, None)
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    names = subprocess.run([sys.executable, script, "--list"], env=env, capture_output=True, text=True,
                           timeout=120, check=True).stdout.splitlines()
    assert len(names) >= 25 and len(set(names)) == len(names)
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for name in names:
        assert f"skip (needs CUDA): {name}" in lines or any(
            line.startswith(f"ok   {name}: ") for line in lines), f"{name}: neither ok nor skipped"
    assert not any(line.startswith("FAIL") for line in lines)
    assert sum(line.startswith("skip (needs CUDA): ") for line in lines) >= 5


def test_async_benchmark_smoke(tmp_path):
    """benchmarks/async_rl.py at a tiny size: both modes run on 2 gloo ranks and report their step,
    busy fractions and the plan's step (the speed-up itself is measured, not tested)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MESHRL_BENCH_RESULTS=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "async_rl.py"), "--iterations", "3",
                           "--skip", "1", "--batch-size", "8", "--new-tokens", "4", "--gen-batch", "4",
                           "--repeats", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = tmp_path.glob("async_rl-*.json")
    rows = {r["max_staleness"]: r for r in json.loads(result.read_text())["rows"]}
    assert set(rows) == {0, 1}
    assert rows[0]["staleness_mean"] == 0 and rows[1]["staleness_mean"] == 1
    for r in rows.values():
        assert r["step_s"] > 0 and r["plan_step_s"] > 0 and 0 < r["gen_busy"] <= 1 and 0 < r["train_busy"] <= 1


def test_generate_rollout_benchmark_smoke(tmp_path):
    """benchmarks/generate.py --rollout --small: every engine gives each sequence exactly its drawn
    length, continuous batching keeps more of its slot-steps busy than static batching, and shared
    prefixes prefill fewer tokens (the times themselves are measured, not tested)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MESHRL_BENCH_RESULTS=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--rollout", "--small",
                           "--iters", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = tmp_path.glob("generate-rollout-small-*.json")
    payload = json.loads(result.read_text())
    rows = {(r["case"], r["k"]): r for r in payload["rows"]}
    for k in payload["ks"]:
        cases = ["meshrl continuous", "meshrl static", "transformers generate, dynamic cache",
                 f"meshrl continuous, equal lengths ({payload['draws'][str(k)]['equal_length']})"]
        for case in cases:
            r = rows[(case, k)]
            assert r["lengths_ok"] is True, (case, k)
            assert 0 < r["slot_util"] <= 1 and r["seconds"] > 0 and r["useful_tok_s"] > 0, (case, k, r)
        assert rows[("meshrl continuous", k)]["slot_util"] > rows[("meshrl static", k)]["slot_util"]
    k = max(payload["ks"])
    shared = rows[("prefill only, shared prefixes", k)]
    unshared = rows[("prefill only, every sample prefills", k)]
    assert shared["lengths_ok"] and unshared["lengths_ok"]
    assert shared["prefill_tokens"] < unshared["prefill_tokens"]


def test_moe_benchmark_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MESHRL_BENCH_RESULTS=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe.py"), "--small"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = tmp_path.glob("moe-small-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["loop", "grouped GEMMs", "sparse", "static"]
    assert all(r["seconds"] > 0 for r in rows) and rows[1]["ratio"] > 0 and rows[3]["ratio"] > 0
    assert rows[1]["max_err"] < 1e-4 and rows[3]["max_err"] == 0  # the same outputs, the same tokens
