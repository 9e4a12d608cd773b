"""Correctness of the model path on a GPU, before any timing: logits against transformers (fp32 and
bf16, the varlen flash path included), greedy generation token for token, and one training step
against the same step on the CPU. Exits non-zero on any mismatch.

    PYTHONPATH=. python benchmarks/gpu_check.py
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import bench_device  # noqa: E402
from meshrl.engine.batch import pack  # noqa: E402
from meshrl.engine.generate import generate, stage_pass  # noqa: E402
from meshrl.engine.model import PackedMeta, build_stage  # noqa: E402
from meshrl.engine.sampling import SamplingParams  # noqa: E402
from meshrl.engine.algorithms.calls import sft_call
from meshrl.engine.train import OptimConfig, Trainer, global_token_count  # noqa: E402
from meshrl.parallel.layout import ParallelLayout  # noqa: E402
from meshrl.testing.tiny_models import make_tiny_hf  # noqa: E402

FAILS = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        FAILS.append(name)


def logits_vs_hf(path, device, dtype, tol):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=path, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    lengths = [5, 40, 1, 17, 64]
    ids = [torch.randint(0, 101, (n,), generator=g) for n in lengths]
    meta = PackedMeta.from_lengths(lengths, device=device)
    with torch.no_grad():
        ours = stage.logits(stage_pass(stage, torch.cat(ids).to(device), meta)).float()
        err = 0.0
        for i, (s, n) in enumerate(zip(meta.cu_seqlens[:-1].tolist(), lengths)):
            ref = hf(ids[i][None].to(device)).logits[0].float()
            err = max(err, (ours[s:s + n, :101] - ref).abs().max().item())
    check(f"logits {os.path.basename(path)} {dtype}", err <= tol, f"max abs diff {err:.3g} (tol {tol})")


def greedy_vs_hf(path, device):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=path, device=device)
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11, 12], [1]]
    r = generate(stage, prompts, SamplingParams(max_new_tokens=12, greedy=True, eos_ids=[2]))
    ref = [hf.generate(torch.tensor([p], device=device), max_new_tokens=12, do_sample=False,
                       eos_token_id=2, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    check("greedy generation = transformers", r.output_ids == ref)


def train_step_vs_cpu(path, device):
    results = []
    for dev in (torch.device("cpu"), device):
        stage = build_stage(ParallelLayout(ranks=[0]), model_dir=path, device=dev)
        trainer = Trainer(stage, OptimConfig(lr=1e-2, eps=1e-3, max_grad_norm=0.5))
        g = torch.Generator().manual_seed(1)
        mbs = [pack([torch.randint(3, 101, (n,), generator=g).tolist() for n in (7, 12, 30)]),
               pack([torch.randint(3, 101, (n,), generator=g).tolist() for n in (5, 9)])]
        m = trainer.step(mbs, sft_call(global_token_count(mbs, stage.layout)))
        results.append((m["loss"], {n: p.detach().cpu() for n, p in stage.named_parameters()}))
    (l0, p0), (l1, p1) = results
    err = max((p0[n] - p1[n]).abs().max().item() for n in p0)
    check("train step cpu vs gpu (fp32)", abs(l0 - l1) < 1e-4 and err < 1e-4,
          f"loss {l0:.6f} vs {l1:.6f}, max param diff {err:.2g}")


def main():
    device = bench_device()
    print("device:", device, torch.cuda.get_device_name(device) if device.type == "cuda" else "")
    with tempfile.TemporaryDirectory() as d:
        llama = make_tiny_hf("llama", os.path.join(d, "llama"), seed=1)
        qwen = make_tiny_hf("qwen2", os.path.join(d, "qwen2"), seed=2)
        for path in (llama, qwen):
            logits_vs_hf(path, device, torch.float32, 1e-4)
            # bf16 on both sides with different kernels (flash varlen vs SDPA): bf16 rounding scale
            logits_vs_hf(path, device, torch.bfloat16, 0.1)
        greedy_vs_hf(llama, device)
        train_step_vs_cpu(qwen, device)
    print("FAILED: " + ", ".join(FAILS) if FAILS else "all GPU checks passed")
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
