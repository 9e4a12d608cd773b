"""Generation throughput: meshrl's fast engine vs transformers' ``generate``, same model size, same
batch, one process.

The case is issue 5's: a ~1.1B Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192, vocab
32000) in bf16, batch 64, 128-token prompts, exactly 256 new tokens (meshrl: no EOS ids; transformers:
``min_new_tokens``), greedy. Rows: meshrl fast greedy, meshrl fast sampled (T=1, top-k 200, the PPO
defaults), transformers with its default dynamic cache, and with ``cache_implementation="static"``
(which transformers compiles itself). Each row reports generated tokens/s (B·256 / seconds per
``generate`` call, prefill included), the first call's time (compilation, graph capture), peak extra
memory, and the fraction of the floor set by reading every weight once per decode step at the
measured copy bandwidth (``benchmarks/anchors/h100.json``).

    python benchmarks/generate.py --check      # GPU: check fast == reference on a small model, then bench
    python benchmarks/generate.py --check-only # only the check (exit status 1 on a mismatch)
    python benchmarks/generate.py --small      # tiny model on CPU: a smoke run in seconds
    python benchmarks/generate.py --skip-hf --profile --variants autotune   # where the step goes

The check builds a small fp32 model on the device and requires the fast engine (CUDA graphs and
torch.compile as used in the benchmark) to give ``generate(engine="reference")``'s tokens exactly,
greedy and sampled, and log-probs within 1e-4; a bf16 copy is compared for information only (bf16
rounding differs between the engines' kernels, so long greedy runs may part ways; ``--check-bf16``).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (anchor, bench_device, device_name, peak_extra_gib, print_table,  # noqa: E402
                               reset_peak, synchronize, time_fn, write_results)

BIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
CHECK = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
COLS = ["case", "seconds", "tokens_per_s", "vs_hf_default", "vs_hf_static", "frac_floor",
        "first_call_s", "peak_extra_GiB"]


def meshrl_stage(cfg_kw, device, dtype, seed=0):
    from meshrl.engine.model import LlamaStage, config_from_hf_dict
    from meshrl.parallel.layout import ParallelLayout
    cfg = config_from_hf_dict({**cfg_kw, "architectures": ["LlamaForCausalLM"]})
    stage = LlamaStage(cfg, ParallelLayout(ranks=[0]), dtype=dtype, device=device)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # seeded on the host so the check's fp32 and bf16 models agree
        for name, p in stage.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.numel() < 2**24:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:  # big matrices: device RNG, the benchmark only times them
                p.normal_(0.0, 0.02)
    return stage


def prompts_for(batch, length, vocab, seed=0, ragged=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, length + 1, (batch,), generator=g).tolist() if ragged else [length] * batch
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- the check ---------------------------------------------------------------------------------------
def check(device, bf16=False) -> bool:
    """Fast engine vs reference engine on a small model: fp32 must match; bf16 (optional, it
    costs another round of compilation) is reported."""
    from meshrl.engine.generation import FastGenerator, FastOptions
    from meshrl.engine.generation import generate
    from meshrl.engine.generation.sampling import SamplingParams
    prompts = prompts_for(8, 40, CHECK["vocab_size"], seed=1, ragged=True)
    # the sampled case also splits decode attention (two 64-position blocks, one per split)
    cases = {"greedy": (SamplingParams(max_new_tokens=48, greedy=True), FastOptions()),
             "sampled": (SamplingParams(max_new_tokens=48, temperature=0.9, top_k=50, top_p=0.9,
                                        min_new_tokens=4, eos_ids=[7], stop_ids=[11], seed=5),
                         FastOptions(attention_splits=2))}
    ok = True
    for dtype in (torch.float32, torch.bfloat16) if bf16 else (torch.float32,):
        stage = meshrl_stage(CHECK, device, dtype, seed=3)
        for name, (params, opts) in cases.items():
            gen = FastGenerator(stage, opts)
            t0 = time.perf_counter()
            fast = gen.generate(prompts, params, seq_offset=2)
            t_fast = time.perf_counter() - t0
            ref = generate(stage, prompts, params, seq_offset=2, engine="reference")
            same = sum(a == b for a, b in zip(ref.output_ids, fast.output_ids))
            prefix = [_common_prefix(a, b) for a, b in zip(ref.output_ids, fast.output_ids)]
            lp = max([abs(x - y) for a, b, n in zip(ref.logprobs, fast.logprobs, prefix)
                      for x, y in zip(a[:n], b[:n])] or [0.0])
            line = (f"check {str(dtype)[6:]} {name}: {same}/{len(prompts)} sequences identical, "
                    f"common prefix {sum(prefix)}/{sum(len(r) for r in ref.output_ids)} tokens, "
                    f"max |dlogprob| on it {lp:.2e}, first call {t_fast:.1f} s, "
                    f"graphs={gen.graphs} compiled={gen.compiled} compile_failed={_repr(gen.compile_failed)} "
                    f"capture_failed={_repr(gen.capture_failed)}")
            if dtype == torch.float32:
                good = same == len(prompts) and ref.finish_reason == fast.finish_reason and lp <= 1e-4
                ok &= good
                line += "  OK" if good else "  MISMATCH"
            print(line + f" (attention splits {opts.attention_splits or 'auto'})", flush=True)
            gen.release()
    return ok


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---- the benchmark -------------------------------------------------------------------------------------
def run_case(name, make, device, tokens, iters, warmup):
    base = reset_peak(device)
    t0 = time.perf_counter()
    fn = make()
    out = fn()  # first call: compilation, graph capture, allocator warm-up
    synchronize(device)
    first = time.perf_counter() - t0
    sec = time_fn(fn, device, warmup=warmup, iters=iters)
    row = {"case": name, "seconds": sec, "tokens_per_s": tokens / sec, "first_call_s": first,
           "peak_extra_GiB": peak_extra_gib(device, base)}
    return row, out


# Engine settings compared side by side with --variants (FastOptions overrides).
VARIANTS = {"autotune": dict(compile_mode="max-autotune-no-cudagraphs"),
            "unfused_mlp": dict(fuse_mlp=False), "torch_attention": dict(attention="torch"),
            "eager_pieces": dict(compile=False), "no_graphs": dict(cuda_graphs=False),
            "stage_prefill": dict(prefill_pieces=False),
            # decode attention launches: programs per (sequence, KV head), positions per loop step
            # (b), warps (w); benchmarks/decode_attention.py sweeps the kernel alone
            "splits2": dict(attention_splits=2), "splits4": dict(attention_splits=4),
            "b32w4": dict(attention_block=32), "b128w4": dict(attention_block=128),
            "b64w8": dict(attention_warps=8), "b128w8": dict(attention_block=128, attention_warps=8),
            "b32w2": dict(attention_block=32, attention_warps=2),
            "splits2_b32w2": dict(attention_splits=2, attention_block=32, attention_warps=2),
            # cuBLAS's other front end for every matmul of the call (the default is cuBLASLt);
            # benchmarks/decode_gemms.py times the matmuls alone
            "cublas": dict(blas="cublas")}


def meshrl_rows(cfg, prompts, new, device, dtype, iters, sampled, variants=()):
    from meshrl.engine.generation import FastGenerator, FastOptions
    from meshrl.engine.generation.sampling import SamplingParams
    stage = meshrl_stage(cfg, device, dtype)
    params = sum(p.numel() for p in stage.parameters())
    greedy = SamplingParams(max_new_tokens=new, greedy=True)
    cases = [("meshrl fast, greedy", greedy, {})]
    if sampled:
        cases.append(("meshrl fast, sampled T=1 top-k 200",
                      SamplingParams(max_new_tokens=new, top_k=200, seed=1), {}))
    cases += [(f"meshrl fast, greedy [{v}]", greedy, VARIANTS[v]) for v in variants]
    rows, gens = [], {}
    for i, (name, sp, opts) in enumerate(cases):
        key = tuple(sorted(opts.items()))
        if key not in gens:
            for other in gens.values():
                other.release()
            gens[key] = FastGenerator(stage, FastOptions(**opts))
        gen = gens[key]
        try:
            row, out = run_case(name, lambda sp=sp: (lambda: gen.generate(prompts, sp)), device,
                                len(prompts) * new, iters, 1)
        except Exception:
            if i == 0:
                raise
            traceback.print_exc()  # the greedy row stands; report the sampled one's failure
            continue
        lengths = {len(o) for o in out.output_ids}
        finite = all(lp <= 0 for lps in out.logprobs for lp in lps)
        row.update(all_lengths=sorted(lengths), logprobs_ok=finite, compiled=gen.compiled,
                   graphs=gen.graphs, compile_failed=_repr(gen.compile_failed),
                   capture_failed=_repr(gen.capture_failed))
        rows.append(row)
        print_table([row], COLS + ["all_lengths", "logprobs_ok"])
    for gen in gens.values():
        gen.release()
    return rows, params, stage


# ---- where a decode step's time goes ---------------------------------------------------------------
KERNEL_KINDS = [("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "mm_")),
                ("decode attention", ("_decode_attention",)),
                ("prefill attention", ("flash", "fmha", "attention")),
                ("compiled pieces", ("triton_",)),
                ("copies/fills", ("copy", "fill", "memcpy", "memset"))]


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, marks in KERNEL_KINDS:
        if any(m in low for m in marks):
            return kind
    return "other eager"


def kernel_times(fn, device):
    """{kind: (total seconds, launches)} of the device kernels one call of ``fn`` runs (host ops'
    self time on CPU, where there are no device kernels)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        synchronize(device)
    out = {}
    for evt in prof.key_averages():
        if cuda:  # kernels only: host ops also carry the device time of what they launched
            if evt.device_type != DeviceType.CUDA:
                continue
            us = getattr(evt, "self_device_time_total", None)
            us = evt.self_cuda_time_total if us is None else us
        else:
            us = evt.self_cpu_time_total
        if us <= 0:
            continue
        kind = kernel_kind(evt.key)
        t, n = out.get(kind, (0.0, 0))
        out[kind] = (t + us * 1e-6, n + evt.count)
    return out


def profile_decode(stage, prompts, new, device):
    """Prefill vs decode time, and one decode step's kernels by kind (from the difference between a
    (1 + n)-token and a 1-token call, profiled without graphs so every kernel is seen)."""
    from meshrl.engine.generation import FastGenerator, FastOptions
    from meshrl.engine.generation.sampling import SamplingParams
    one, full = SamplingParams(max_new_tokens=1, greedy=True), SamplingParams(max_new_tokens=new, greedy=True)
    gen = FastGenerator(stage)
    t_one = time_fn(lambda: gen.generate(prompts, one), device, warmup=1, iters=3)
    t_full = time_fn(lambda: gen.generate(prompts, full), device, warmup=1, iters=3)
    gen.release()
    n = min(new, 33) - 1
    eager = FastGenerator(stage, FastOptions(cuda_graphs=False))
    short = SamplingParams(max_new_tokens=n + 1, greedy=True)
    eager.generate(prompts, short)  # compile and warm up outside the profile
    base, long = kernel_times(lambda: eager.generate(prompts, one), device), \
        kernel_times(lambda: eager.generate(prompts, short), device)
    eager.release()
    step_s = (t_full - t_one) / (new - 1)
    rows = [{"part": "prefill + first token (call with 1 new token)", "ms": t_one * 1e3},
            {"part": f"decode step as benchmarked, mean of {new - 1}", "ms": step_s * 1e3}]
    kernels = 0.0
    for kind in sorted(long, key=lambda k: -long[k][0]):
        t = (long[kind][0] - base.get(kind, (0.0, 0))[0]) / n
        launches = (long[kind][1] - base.get(kind, (0.0, 0))[1]) / n
        kernels += t
        rows.append({"part": f"  per step: {kind}", "ms": t * 1e3, "launches": launches})
    rows.append({"part": "  per step: all kernels", "ms": kernels * 1e3})
    rows.append({"part": "  per step: gaps (step - kernels)", "ms": (step_s - kernels) * 1e3})
    print_table(rows, ["part", "ms", "launches"])
    return rows


def _repr(exc):
    return None if exc is None else repr(exc)[:300]


def hf_rows(cfg, prompts, new, device, dtype, static_too):
    import transformers
    ids = torch.tensor(prompts, device=device)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **cfg, attn_implementation="sdpa", eos_token_id=2, pad_token_id=0))
    model = model.to(dtype).eval()
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
              do_sample=False, pad_token_id=0, eos_token_id=2)
    cases = [("transformers generate, dynamic cache", {})]
    if static_too:
        cases.append(("transformers generate, static cache (compiled)",
                      {"cache_implementation": "static"}))
    rows = []
    for name, extra in cases:
        def make(extra=extra):
            return lambda: model.generate(ids, **kw, **extra)
        try:
            with torch.no_grad():
                row, out = run_case(name, make, device, len(prompts) * new, 1, 0)
        except Exception as exc:  # noqa: BLE001 - a baseline failure should not lose meshrl's rows
            print(f"{name}: failed: {exc!r:.500}", flush=True)
            continue
        row["all_lengths"] = [out.shape[1] - ids.shape[1]]
        rows.append(row)
        print_table([row], COLS + ["all_lengths"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny model and batch (CPU smoke)")
    p.add_argument("--check", action="store_true", help="check fast == reference first")
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--check-bf16", action="store_true", help="also compare a bf16 copy (information)")
    p.add_argument("--skip-hf-static", action="store_true")
    p.add_argument("--skip-hf", action="store_true", help="skip both transformers rows")
    p.add_argument("--variants", default="", help="comma-separated engine settings to add as rows: "
                   + ", ".join(VARIANTS))
    p.add_argument("--profile", action="store_true",
                   help="break a decode step down by kernel kind (torch.profiler)")
    p.add_argument("--no-sampled", action="store_true", help="skip the sampled meshrl row")
    p.add_argument("--iters", type=int, default=None)
    args = p.parse_args(argv)
    device = bench_device()
    print(f"device {device_name(device)}, torch {torch.__version__}", flush=True)
    checked = None
    if args.check or args.check_only:
        t0 = time.perf_counter()
        checked = check(device, bf16=args.check_bf16)
        print(f"check {'passed' if checked else 'FAILED'} in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.check_only:
            return 0 if checked else 1
    small = args.small or device.type == "cpu"
    cfg = SMALL if small else BIG
    batch, plen, new = (4, 16, 16) if small else (64, 128, 256)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    iters = args.iters or (2 if small else 3)
    prompts = prompts_for(batch, plen, cfg["vocab_size"])
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    rows, params, stage = meshrl_rows(cfg, prompts, new, device, dtype, iters, not args.no_sampled,
                                      variants)
    limit_s = params * torch.finfo(dtype).bits / 8 / (anchor("copy_bw", "TBps", 3.0) * 1e12)
    extra = {"params": params, "layers": cfg["num_hidden_layers"], "batch": batch, "prompt": plen,
             "new_tokens": new, "small": small,
             "decode_step_limit_s": limit_s, "check_passed": checked}
    stem = "generate-small" if small else "generate"
    if variants or args.profile or args.skip_hf:  # the default run's file (plan's rates) stays
        stem += "-" + "-".join(variants + (["profile"] if args.profile else []) or ["variants"])
    _summarise(rows, batch / limit_s)
    write_results(stem, device, rows, extra)  # kept if a baseline below runs out of time
    if args.profile:
        extra["profile"] = profile_decode(stage, prompts, new, device)
        write_results(stem, device, rows, extra)
    del stage
    _free(device)
    if not args.skip_hf:
        rows += hf_rows(cfg, prompts, new, device, dtype, not (small or args.skip_hf_static))
    _summarise(rows, batch / limit_s)
    print()
    print_table(rows, COLS)
    if not small:
        print(goal_line(rows))
    print(f"wrote {write_results(stem, device, rows, extra)}")
    return 0 if checked in (None, True) else 1


GOAL_TOKENS_PER_S = 40_000  # the 1.1B case on one H100, greedy


def goal_line(rows) -> str:
    """The generation goal against the greedy row, in one line a GPU session's log shows."""
    greedy = next(r for r in rows if r["case"] == "meshrl fast, greedy")
    static = greedy.get("vs_hf_static")
    met = greedy["tokens_per_s"] >= GOAL_TOKENS_PER_S
    return (f"goal ≥ {GOAL_TOKENS_PER_S:,} tokens/s: {greedy['tokens_per_s']:,.0f} "
            f"({greedy['tokens_per_s'] / GOAL_TOKENS_PER_S:.0%})"
            + (f", {static:.2f}× transformers' static cache" if static else "")
            + (" — met" if met else " — NOT met"))


def _summarise(rows, floor_tokens_per_s):
    by_name = {r["case"]: r for r in rows}
    hf_default = by_name.get("transformers generate, dynamic cache")
    hf_static = by_name.get("transformers generate, static cache (compiled)")
    for r in rows:
        r["vs_hf_default"] = r["tokens_per_s"] / hf_default["tokens_per_s"] if hf_default else None
        r["vs_hf_static"] = r["tokens_per_s"] / hf_static["tokens_per_s"] if hf_static else None
        r["frac_floor"] = r["tokens_per_s"] / floor_tokens_per_s


def _free(device):
    gc.collect()
    if device.type != "cpu":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
