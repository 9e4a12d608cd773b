"""Decode attention over a static KV cache: meshrl's Triton kernel against SDPA over the cache, in
one process.

    PYTHONPATH=. python benchmarks/decode_attention.py           # a GPU: the cases below (~1 min on an H100)
    PYTHONPATH=. python benchmarks/decode_attention.py --small   # CPU, Triton interpreter: a smoke test

One decode step's attention for one layer: append each sequence's new (rotated) key and value at its
length, then attend over the positions it sees. The baseline is the engine's torch path (rotary
embeddings, then SDPA over the whole capacity under a length mask, as a static cache does); meshrl's
kernel walks only the filled positions and, when batch × KV heads leaves SMs idle, splits each
(sequence, KV head) across programs. Every configuration is checked against the baseline before it
is timed (CUDA-graph replays, so launch costs are left out as in the captured step). Columns: the
baseline's and meshrl's seconds, `speedup`, `GBps` (K/V bytes read over meshrl's time), `frac_floor`
(the copy anchor's time for those bytes over meshrl's), and the best of a sweep over block size and
warps next to the shipped one. Figures go to benchmarks/results/decode_attention[-small]-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():  # Triton decides at import whether kernels are interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.harness import anchor, bench_device, print_table, time_fn, write_results  # noqa: E402
from meshrl.kernels import decode_attention as A  # noqa: E402
from meshrl.engine.model.attention import rope_cos_sin  # noqa: E402

# (name, batch, q heads, kv heads, head dim, capacity, filled positions)
CASES = [
    ("1.1B decode, batch 64 (the generate benchmark)", 64, 32, 8, 64, 384, 256),
    ("1.1B decode, batch 8", 8, 32, 8, 64, 384, 256),
    ("70B at tp 8 (1 KV head), batch 16, 4k context", 16, 8, 1, 128, 4096, 3072),
    ("7B (32 KV heads), batch 4, 4k context", 4, 32, 32, 128, 4096, 2048),
]
SMALL_CASES = [("tiny, batch 2", 2, 4, 2, 16, 192, 150), ("tiny, batch 1, one KV head", 1, 2, 1, 16, 256, 200)]
SWEEP = [(bn, w) for bn in (32, 64, 128) for w in (2, 4, 8)]


def inputs(b, hq, hkv, d, cap, filled, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    lengths = torch.full((b,), filled, device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    return dict(q=rnd(b, hq, d), k_new=rnd(b, hkv, d), v_new=rnd(b, hkv, d),
                k_cache=rnd(b, hkv, cap, d), v_cache=rnd(b, hkv, cap, d), lengths=lengths,
                rope=rope_cos_sin(inv_freq, lengths, dtype))


def baseline(t):
    return A.attend(t["q"], t["k_new"], t["v_new"], t["k_cache"], t["v_cache"], t["lengths"],
                    backend="torch", rope=t["rope"])


def meshrl(t, splits, block_n=A.BLOCK_N, num_warps=A.NUM_WARPS):
    return A.launch(t["q"], t["k_new"], t["v_new"], t["k_cache"], t["v_cache"], t["lengths"], None,
                    t["rope"], splits, block_n=block_n, num_warps=num_warps)


def timer(device):
    if device.type != "cuda":
        return lambda fn: time_fn(fn, device, warmup=1, iters=3)
    import triton.testing

    def measure(fn):
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") / 1e3
        except RuntimeError as e:  # not capturable here: launches timed back to back instead
            print(f"(CUDA graph timing failed, {type(e).__name__}: {str(e)[:120]}; timing launches)")
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return measure


def check(got, want, what):
    err = (got.float() - want.float()).abs().max().item()
    tol = 2e-2 if got.dtype == torch.bfloat16 else 1e-4
    if not err <= tol:
        raise SystemExit(f"{what}: max |meshrl - torch| = {err:.3g} > {tol}")
    return err


def run_case(case, dtype, device, measure, sweep):
    name, b, hq, hkv, d, cap, filled = case
    t = inputs(b, hq, hkv, d, cap, filled, dtype, device)
    want = baseline(t)
    # on CPU a fixed split count, so the smoke run takes the split path too
    auto = A.auto_splits(t["k_cache"]) if device.type == "cuda" else 2
    configs = {(s, A.BLOCK_N, A.NUM_WARPS) for s in (1, auto)}
    configs |= {(auto, bn, w) for bn, w in sweep}
    times, errs = {}, {}
    for s, bn, w in sorted(configs):
        errs[s, bn, w] = check(meshrl(t, s, bn, w), want, f"{name}, splits {s}, block {bn}, warps {w}")
        times[s, bn, w] = measure(lambda: meshrl(t, s, bn, w))
    base = measure(lambda: baseline(t))
    shipped, unsplit = times[auto, A.BLOCK_N, A.NUM_WARPS], times[1, A.BLOCK_N, A.NUM_WARPS]
    best = min(times, key=times.get)
    kv_bytes = 2 * b * hkv * (filled + 1) * d * t["q"].element_size()
    floor = kv_bytes / (anchor("copy_bw", "TBps", 3.0) * 1e12)
    return dict(case=name, batch=b, kv_heads=hkv, head_dim=d, capacity=cap, filled=filled,
                programs=b * hkv, splits=auto, torch_s=base, meshrl_s=shipped,
                speedup=base / shipped, unsplit_s=unsplit, split_gain=unsplit / shipped,
                GBps=kv_bytes / shipped / 1e9, frac_floor=floor / shipped,
                best=f"splits {best[0]}, block {best[1]}, warps {best[2]}", best_s=times[best],
                best_gain=shipped / times[best], max_err=max(errs.values()),
                sweep={f"{s}/{bn}/{w}": v for (s, bn, w), v in times.items()})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU: the Triton interpreter)")
    p.add_argument("--no-sweep", action="store_true", help="time only the shipped and unsplit kernels")
    args = p.parse_args()
    device = bench_device()
    small = args.small or device.type == "cpu"
    cases = SMALL_CASES if small else CASES
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    sweep = [] if args.no_sweep or small else SWEEP
    measure = timer(device)
    rows = [run_case(c, dtype, device, measure, sweep) for c in cases]
    print_table(rows, ["case", "programs", "splits", "torch_s", "meshrl_s", "speedup", "split_gain",
                       "GBps", "frac_floor", "best", "best_gain", "max_err"])
    if small:
        print("(CPU: the kernel runs in the Triton interpreter; the times say nothing of a GPU)")
    path = write_results("decode_attention" + ("-small" if small else ""), device, rows,
                         {"dtype": str(dtype), "shipped": dict(block_n=A.BLOCK_N,
                                                               num_warps=A.NUM_WARPS)})
    print("wrote", path)


if __name__ == "__main__":
    main()
