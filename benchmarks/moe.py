"""Mixture-of-experts paths side by side, in one process: a sparse layer's expert matmuls as a loop
against grouped GEMMs, and the fast engine's decode with sparse layers run sparse (each row to its k
experts, not captured) against static (every local expert on every slot; captured on a GPU).

    PYTHONPATH=. python benchmarks/moe.py          # a GPU: Qwen3-30B-A3B's expert shapes, bf16
    PYTHONPATH=. python benchmarks/moe.py --small  # CPU: tiny shapes, fp32, a smoke test

Experts: one sparse layer holding 16 experts (what a rank holds of Qwen3-30B-A3B's 128 at ep=8:
hidden 2048, expert intermediate 768), its tokens routed to one expert each (the rows a rank's
experts receive at top-8 of 128 when routing is balanced); forward and backward, seconds per layer
call for the loop and the grouped GEMMs (torch._grouped_mm; CUDA runs it in bf16 only, the CPU
row is its fp32 path) and their ratio. Decode: a 4-layer MoE model (16 experts, top-2), greedy,
64 slots, tokens per second for each decode path and their ratio. Figures go to
benchmarks/results/moe[-small]-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import bench_device, print_table, time_fn, write_results  # noqa: E402
from meshrl.engine.model import build_stage  # noqa: E402
from meshrl.engine.model.config import config_from_hf_dict  # noqa: E402
from meshrl.engine.model.moe import SparseMoE  # noqa: E402
from meshrl.parallel.layout import ParallelLayout  # noqa: E402

COLS = ["case", "variant", "seconds", "tokens_per_s", "ratio", "max_err"]


def moe_config(hidden, inter, experts, k, layers=1, vocab=1000):
    return config_from_hf_dict({
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "moe_intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 128), "num_key_value_heads": max(1, hidden // 512),
        "head_dim": 128 if hidden >= 128 else hidden, "num_experts": experts,
        "num_experts_per_tok": k, "norm_topk_prob": True, "max_position_embeddings": 4096})


def experts_rows(small, device, dtype):
    hidden, inter, tokens = (64, 32, 256) if small else (2048, 768, 4096)
    cfg = moe_config(hidden, inter, 16, 1)
    stage = build_stage(ParallelLayout(ranks=[0]), config=cfg, dtype=dtype, device=device, seed=0)
    layer = next(m for m in stage.modules() if isinstance(m, SparseMoE))
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g).requires_grad_()
    rows, out = [], {}
    for grouped in (False, True):
        layer.grouped = grouped

        def call():
            x.grad = None
            y = layer(x)
            y.float().square().mean().backward()
            return y
        sec = time_fn(call, device, warmup=1 if small else 3, iters=3 if small else 10)
        out[grouped] = call().detach().float()
        rows.append({"case": f"experts: 16 × [{hidden}→{inter}→{hidden}], {tokens} rows, fwd+bwd",
                     "variant": "grouped GEMMs" if grouped else "loop", "seconds": sec,
                     "tokens_per_s": tokens / sec})
    rows[1]["ratio"] = rows[0]["seconds"] / rows[1]["seconds"]
    rows[1]["max_err"] = float((out[True] - out[False]).abs().max())
    return rows


def decode_rows(small, device, dtype):
    from meshrl.engine.generation import FastGenerator, FastOptions
    from meshrl.engine.generation.sampling import SamplingParams
    hidden, inter, new = (64, 32, 16) if small else (1024, 512, 64)
    cfg = moe_config(hidden, inter, 16, 2, layers=4)
    stage = build_stage(ParallelLayout(ranks=[0]), config=cfg, dtype=dtype, device=device, seed=0,
                        init_std=0.2)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1000, (16,), generator=g).tolist() for _ in range(64)]
    params = SamplingParams(max_new_tokens=new, greedy=True)
    rows, outs = [], {}
    for decode in ("sparse", "static"):
        graphs = decode == "static" and device.type == "cuda"
        gen = FastGenerator(stage, FastOptions(expert_decode=decode, cuda_graphs=graphs or None))
        gen.generate(prompts, params)  # compile, capture
        sec = time_fn(lambda: gen.generate(prompts, params), device, warmup=0, iters=1 if small else 3)
        outs[decode] = gen.generate(prompts, params).output_ids
        tokens = sum(map(len, outs[decode]))
        rows.append({"case": f"decode: 4 layers, 16 experts top-2, hidden {hidden}, 64 slots",
                     "variant": f"{decode}{' (captured)' if graphs else ''}", "seconds": sec,
                     "tokens_per_s": tokens / sec})
    rows[1]["ratio"] = rows[0]["seconds"] / rows[1]["seconds"]
    same = sum(a == b for a, b in zip(outs["sparse"], outs["static"]))
    rows[1]["max_err"] = float(len(prompts) - same)  # sequences whose tokens differ
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes on CPU (smoke test)")
    args = ap.parse_args()
    small = args.small or not torch.cuda.is_available()
    device = torch.device("cpu") if small else bench_device()
    dtype = torch.float32 if small else torch.bfloat16
    rows = experts_rows(small, device, dtype) + decode_rows(small, device, dtype)
    print_table(rows, COLS)
    print("ratio: the first row's seconds over the second's (above 1: the second is faster); "
          "max_err: the experts' max |Δ output|, the decode's sequences whose tokens differ")
    path = write_results("moe" + ("-small" if small else ""), device, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
