"""Training throughput: meshrl vs transformers' LlamaForCausalLM, same model, same batch, one process.

The model is a ~1.1B Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192, vocab 32000) in
bf16 on an 8×2048-token batch. Rows time forward+backward (the baseline's published figure) for
transformers eager and torch.compile'd, and meshrl eager and with compiled decoder layers; a last
row adds meshrl's optimizer step (ZeRO-1 AdamW, fp32 master weights). MFU = 6·params·tokens/time
over the measured 769 TFLOP/s bf16 matmul ceiling.

    python benchmarks/train_throughput.py            # the real sizes (GPU)
    python benchmarks/train_throughput.py --small    # a tiny smoke run (CPU)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (anchor, bench_device, peak_extra_gib, print_table, reset_peak,  # noqa: E402
                               time_fn, write_results)

BIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def hf_step(cfg_kw, ids, device, dtype, compiled):
    import transformers
    cfg = transformers.LlamaConfig(**cfg_kw, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    fwd = torch.compile(model) if compiled else model

    def step():
        loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None
    return step, sum(p.numel() for p in model.parameters()), model


def meshrl_stage(cfg_kw, device, dtype, compiled):
    from meshrl.engine.model import LlamaStage, config_from_hf_dict
    from meshrl.parallel.layout import ParallelLayout
    cfg = config_from_hf_dict({**cfg_kw, "architectures": ["LlamaForCausalLM"]})
    stage = LlamaStage(cfg, ParallelLayout(ranks=[0]), dtype=dtype, device=device)
    with torch.no_grad():  # plain device RNG: the seeded layout-independent init is not timed here
        for name, p in stage.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    if compiled:
        for layer in stage.model.layers.values():
            layer.compile(dynamic=False)
    return stage


def meshrl_batch(n_seq, seq_len, vocab, device):
    from meshrl.engine.batch import pack
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, vocab, (n_seq, seq_len), generator=g).tolist()
    return pack(seqs).to(device)


def meshrl_step(stage, mb):
    def step():
        h = stage(mb.input_ids, mb.meta)
        logp = stage.token_logprobs(h, mb.tokens["labels"])
        loss = -(logp * mb.tokens["loss_mask"]).sum() / mb.tokens["loss_mask"].sum()
        loss.backward()
        for p in stage.parameters():
            p.grad = None
    return step


def meshrl_train_step(stage, mb):
    from meshrl.engine.algorithms.calls import sft_call
    from meshrl.engine.train import OptimConfig, Trainer
    trainer = Trainer(stage, OptimConfig(lr=1e-5, zero1=False))
    count = float(mb.tokens["loss_mask"].sum())
    return lambda: trainer.step([mb], sft_call(count))


def run_case(name, make, device, tokens, params, iters, warmup):
    base = reset_peak(device)
    t0 = time.perf_counter()
    step = make()
    step()  # first call: compilation, allocator warm-up
    first = time.perf_counter() - t0
    sec = time_fn(step, device, warmup=warmup, iters=iters)
    return {"case": name, "seconds": sec, "tokens_per_s": tokens / sec,
            "model_TFLOPs": 6 * params * tokens / sec / 1e12,
            "MFU": 6 * params * tokens / sec / (anchor("bf16_matmul", "TFLOPs", 769.0) * 1e12),
            "peak_extra_GiB": peak_extra_gib(device, base), "first_call_s": first}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny model and batch (CPU smoke)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--skip-hf-compiled", action="store_true")
    args = p.parse_args(argv)
    device = bench_device()
    small = args.small or device.type == "cpu"
    cfg = SMALL if small else BIG
    n_seq, seq_len = (2, 64) if small else (8, 2048)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    iters, warmup = (args.iters or (2 if small else 10)), (1 if small else 3)
    tokens = n_seq * seq_len
    ids = torch.randint(0, cfg["vocab_size"], (n_seq, seq_len), device=device)
    mb = meshrl_batch(n_seq, seq_len, cfg["vocab_size"], device)
    rows = []
    _, params, model = hf_step(cfg, ids, device, dtype, False)
    del model
    cases = [("transformers eager", lambda: hf_step(cfg, ids, device, dtype, False)[0])]
    if not (small or args.skip_hf_compiled):
        cases.append(("transformers compiled", lambda: hf_step(cfg, ids, device, dtype, True)[0]))
    cases.append(("meshrl eager", lambda: meshrl_step(meshrl_stage(cfg, device, dtype, False), mb)))
    compiled = {}  # one compiled stage serves both rows: a second compile would cost ~40 s

    def compiled_stage():
        if "stage" not in compiled:
            compiled["stage"] = meshrl_stage(cfg, device, dtype, not small)
        return compiled["stage"]
    if not small:
        cases.append(("meshrl compiled layers", lambda: meshrl_step(compiled_stage(), mb)))
    cases.append(("meshrl + optimizer step", lambda: meshrl_train_step(compiled_stage(), mb)))
    for name, make in cases:
        rows.append(run_case(name, make, device, tokens, params, iters, warmup))
        if device.type != "cpu":
            torch.cuda.empty_cache()
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup_vs_hf_eager"] = base / r["seconds"]
    print_table(rows, ["case", "seconds", "tokens_per_s", "model_TFLOPs", "MFU",
                       "speedup_vs_hf_eager", "peak_extra_GiB", "first_call_s"])
    path = write_results("train_throughput", device, rows,
                         {"params": params, "tokens": tokens, "small": small})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
