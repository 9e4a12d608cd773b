"""The decode step's matmuls (64 rows against each weight) under cuBLAS's two front ends and the
transposed product, in one process.

    PYTHONPATH=. python benchmarks/decode_gemms.py          # a GPU: the 1.1B case, ~20 s on an H100
    PYTHONPATH=. python benchmarks/decode_gemms.py --small  # CPU: tiny shapes, a smoke test

A decode step at batch 64 reads every weight once for 64 rows, so its matmuls are bound by memory
bandwidth; `benchmarks/generate.py --profile` puts them at two thirds of the 1.1B step. Each shape
runs over one weight per layer (16 distinct weights, as in the model, so the L2 cache holds none
between uses), captured in a CUDA graph so launch costs are left out as in the captured step. Rows:
`F.linear` with cuBLAS (`torch.backends.cuda.preferred_blas_library`), the same with cuBLASLt, and
`W @ xᵀ` (the transposed product, whose [N, 64] output the caller would read transposed). Columns:
microseconds per layer, `GBps` (weight bytes over time) and `frac_floor` (over the copy anchor).
Figures go to benchmarks/results/decode_gemms[-small]-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import anchor, bench_device, print_table, time_fn, write_results  # noqa: E402
from meshrl.engine.generation.fast import preferred_blas  # noqa: E402

# (name, out features N, in features K) of the 1.1B Llama's decode matmuls, per layer
SHAPES = [("qkv (fused)", 3072, 2048), ("o", 2048, 2048), ("gate+up (fused)", 16384, 2048),
          ("down", 2048, 8192), ("lm head (once a step)", 32000, 2048)]
SMALL_SHAPES = [("qkv", 96, 64), ("down", 64, 128)]
COLS = ["shape", "variant", "us_per_layer", "GBps", "frac_floor", "max_err"]


def products(x, weights):
    """{variant: fn over all layers' weights}; each returns the last product (for the check)."""
    def linear():
        for w in weights:
            y = F.linear(x, w)
        return y

    def transposed():
        for w in weights:
            y = torch.mm(w, x.t())
        return y.t()
    return {"cublas": linear, "cublaslt": linear, "W @ xT": transposed}


def timed(fn, device, backend):
    """Seconds per call of ``fn`` with ``backend`` as cuBLAS's front end (replays of a CUDA graph
    on a GPU, captured under that backend); the output for the check."""
    with preferred_blas("cublaslt" if backend == "cublaslt" else "cublas", device):
        if device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()  # warm-up: cuBLAS chooses and caches its kernel outside the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn()
            return time_fn(graph.replay, device, warmup=3, iters=20), out.clone()
        return time_fn(fn, device, warmup=1, iters=5), fn()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes on CPU (smoke test)")
    ap.add_argument("--rows", type=int, default=64, help="rows per matmul (the decode batch)")
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()
    small = args.small or not torch.cuda.is_available()
    device = torch.device("cpu") if small else bench_device()
    dtype = torch.float32 if small else torch.bfloat16
    ceiling = None if small else anchor("copy_bw", "TBps")
    rows = []
    for name, n, k in SMALL_SHAPES if small else SHAPES:
        layers = 1 if name.startswith("lm head") else args.layers
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(args.rows, k, device=device, dtype=dtype, generator=g)
        weights = [torch.randn(n, k, device=device, dtype=dtype, generator=g) * k ** -0.5
                   for _ in range(layers)]
        want = F.linear(x.float(), weights[-1].float())
        nbytes = layers * n * k * weights[0].element_size()
        for variant, fn in products(x, weights).items():
            sec, out = timed(fn, device, variant)
            err = (out.float() - want).abs().max().item()
            bw = nbytes / sec
            rows.append({"shape": f"{name} [{args.rows}×{k}]·[{k}×{n}]", "variant": variant,
                         "us_per_layer": sec / layers * 1e6, "GBps": bw / 1e9,
                         "frac_floor": bw / (ceiling * 1e12) if ceiling else None, "max_err": err})
            if err > (1e-3 if small else 0.1):
                raise SystemExit(f"{name} {variant}: max error {err:.3g} against the fp32 product")
        del weights
    print_table(rows, COLS)
    path = write_results("decode_gemms" + ("-small" if small else ""), device, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
