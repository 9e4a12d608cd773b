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

``--rollout`` benchmarks a rollout's long-tailed lengths instead (``rollout``). Each sequence's length
is drawn from a seeded log-normal (median 64, sigma of the log 1.0, rounded, clipped to [1, 1024]);
greedy decoding with no EOS ids and meshrl's per-sequence ``limits`` (transformers: EOS forced at the
drawn length by a logits processor and masked before it) make every engine emit exactly the drawn
lengths, which is checked. On a GPU: 512 prompts of 128 tokens, the 1.1B model above in bf16, 128
slots (transformers: static batches of 128 rows), k = 1 and 8 samples per prompt (samples draw their
own lengths), 16-step decode chunks. Rows per k: meshrl continuous (refill), meshrl static
(``refill=False``), meshrl continuous with every length the drawn mean ("equal lengths", same
sequences and slots), transformers (dynamic cache); then, for the largest k, a prefill-only call
(one new token each) with shared prefixes and with every sample prefilling its prompt. Columns:
seconds (median), useful tokens/s (output tokens kept / seconds), slot utilisation (useful decode
tokens, i.e. tokens beyond each sequence's first, which the prefill gives, over slot-steps: slots ×
decode steps for meshrl, each batch's rows × its longest row's decode steps for transformers), and
ratios to static, transformers, the equal-length row and the unshared prefill. The goals (GPU case):
long-tailed ≥ 0.9× the equal-length useful tokens/s and ≥ 2× static; k = 8 prefill ≥ 6× faster
shared. ``--small`` (the default on CPU, where it runs single-threaded) is a tiny version: 32 prompts
of 16 tokens, the SMALL model in fp32, 8 slots, median 16 capped at 64, k = 1 and 4, 4-step chunks.

    python benchmarks/generate.py --rollout                    # GPU: the issue's case
    python benchmarks/generate.py --rollout --hf-batches 8     # transformers on its first 8 batches only
    python benchmarks/generate.py --rollout --small            # tiny version on CPU, seconds

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
    p.add_argument("--rollout", action="store_true",
                   help="long-tailed lengths: continuous vs static batching vs transformers")
    p.add_argument("--hf-batches", type=int, default=None,
                   help="--rollout: time transformers on its first N static batches only")
    args = p.parse_args(argv)
    device = bench_device()
    print(f"device {device_name(device)}, torch {torch.__version__}", flush=True)
    if args.rollout:
        small = args.small or device.type == "cpu"
        return rollout(device, small=small, iters=args.iters or (3 if small else 1),
                       hf_batches=args.hf_batches, skip_hf=args.skip_hf)
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


# ---- rollout: long-tailed lengths ---------------------------------------------------------------
# The case on a GPU: 512 prompts of 128 tokens, the 1.1B model (BIG) in bf16, 128 slots,
# lengths log-normal (median 64, sigma 1.0: mean ≈ 105, 1% above ≈ 660) capped at 1,024, k = 1
# and 8 samples per prompt, the engine's default 16-step decode chunks. The small case (CPU,
# --small) keeps the shape of it at a size that runs in seconds: 32 prompts of 16 tokens, the SMALL
# model in fp32, 8 slots, median 16 capped at 64, k = 1 and 4, 4-step chunks (chunk / median as
# on the GPU).
ROLLOUT = dict(prompts=512, prompt_len=128, median=64, sigma=1.0, cap=1024, slots=128, ks=(1, 8),
               check_every=16, seed=0)
ROLLOUT_SMALL = dict(prompts=32, prompt_len=16, median=16, sigma=1.0, cap=64, slots=8, ks=(1, 4),
                     check_every=4, seed=0)
ROLLOUT_COLS = ["case", "k", "seqs", "seconds", "useful_tok_s", "slot_util", "vs_static", "vs_hf",
                "vs_equal", "vs_unshared", "lengths_ok", "prefill_tokens", "first_call_s"]
EOS = 2  # the token transformers is forced to end each row with (meshrl runs with no EOS ids)
GOAL_VS_EQUAL = 0.9  # long-tailed useful tokens/s over the equal-length case's
GOAL_VS_STATIC = 2.0  # over meshrl's static batching
GOAL_PREFILL = 6.0  # k = 8: prefill with every sample prefilling its prompt / sharing it


def draw_lengths(n, median, sigma, cap, seed):
    """n lengths from a log-normal with the given median and sigma (of the log), rounded and
    clipped to [1, cap]; seeded on the host, so every engine gets the same ones."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return (median * torch.exp(sigma * z)).round().clamp(1, cap).long().tolist()


def _meshrl_run(gen, prompts, params, k, slots, limits, device, iters):
    """Warm up (compilation, graph capture, the allocator: a short call that fills every slot,
    then refills some, so the prefill also meets a second row count), then time the call (median of
    ``iters``); returns (seconds, result, last_stats, warm-up seconds)."""
    n_warm = min(len(limits), slots + slots // 2)
    warm_limits = [min(params.max_new_tokens, 2 * gen.opts.check_every + 1)] * n_warm
    warm_prompts = prompts[:-(-n_warm // k)]
    t0 = time.perf_counter()
    gen.generate(warm_prompts, params, samples=k, slots=slots,
                 limits=(warm_limits + [1] * (len(warm_prompts) * k - n_warm)))
    synchronize(device)
    first = time.perf_counter() - t0
    out = None

    def call():
        nonlocal out
        out = gen.generate(prompts, params, samples=k, slots=slots, limits=limits)
    sec = time_fn(call, device, warmup=0, iters=iters)
    return sec, out, dict(gen.last_stats), first


def _meshrl_row(name, k, gen, prompts, params, slots, limits, device, iters):
    sec, out, st, first = _meshrl_run(gen, prompts, params, k, slots, limits, device, iters)
    got = [len(o) for o in out.output_ids]
    useful = st["generated_tokens"] - len(got)  # the first token of each comes from the prefill
    slot_steps = st["slots"] * st["decode_steps"]
    return {"case": name, "k": k, "seqs": len(got), "seconds": sec, "useful_tok_s": sum(got) / sec,
            "slot_util": useful / slot_steps if slot_steps else None, "lengths_ok": got == limits,
            "prefill_tokens": st["prefill_tokens"], "first_call_s": first, "slot_steps": slot_steps,
            "useful_decode_tokens": useful, "tokens": sum(got), "admissions": st["admissions"],
            "finish_reasons": sorted(set(out.finish_reason))}


class ForceEOSAt:
    """A transformers LogitsProcessor: row r ends with EOS as its ``lengths[r]``-th new token and
    never emits EOS before (greedy then gives each row exactly its drawn length)."""

    def __init__(self, lengths, prompt_len, eos, device):
        self.last = torch.tensor(lengths, device=device) - 1  # the step that must give EOS
        self.prompt_len, self.eos = prompt_len, eos

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len  # tokens generated before this one
        scores = scores.clone()
        scores[:, self.eos] = float("-inf")
        at = (self.last == step)[:, None]
        eos_only = torch.full_like(scores, float("-inf"))
        eos_only[:, self.eos] = 0.0
        return torch.where(at, eos_only, scores)


def _hf_lengths(out, prompt_len, eos):
    """New tokens per row up to and including the first EOS (all of them when there is none)."""
    new = out[:, prompt_len:]
    hit = new == eos
    first = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full_like(hit[:, 0], new.shape[1],
                                                                            dtype=torch.long))
    return first.tolist()


def _hf_row(model, flat_prompts, lengths, slots, device, batches=None, iters=1):
    """transformers ``generate`` (dynamic cache, greedy) over static batches of ``slots`` rows
    (each runs until its longest row ends; finished rows are padded), EOS forced at each row's
    drawn length; seconds are the median of ``iters`` passes over the batches."""
    from transformers import LogitsProcessorList
    plen = len(flat_prompts[0])
    spans = [(lo, min(lo + slots, len(flat_prompts))) for lo in range(0, len(flat_prompts), slots)]
    spans = spans[:batches] if batches else spans

    def run(lo, hi, lens):
        ids = torch.tensor(flat_prompts[lo:hi], device=device)
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max(lens),
                              do_sample=False, pad_token_id=0, eos_token_id=EOS,
                              logits_processor=LogitsProcessorList(
                                  [ForceEOSAt(lens, plen, EOS, device)]))
    with torch.no_grad():
        t0 = time.perf_counter()
        lo, hi = spans[0]
        run(lo, hi, [min(x, 4) for x in lengths[lo:hi]])  # warm-up
        synchronize(device)
        first = time.perf_counter() - t0
        got, slot_steps = [], 0

        def call():
            got.clear()
            for lo, hi in spans:
                got.extend(_hf_lengths(run(lo, hi, lengths[lo:hi]), plen, EOS))
        sec = time_fn(call, device, warmup=0, iters=iters)
        for lo, hi in spans:  # decode steps: each row's first token comes from the prefill
            slot_steps += (hi - lo) * (max(lengths[lo:hi]) - 1)
    want = lengths[:spans[-1][1]]
    useful = sum(want) - len(want)
    return {"seconds": sec, "useful_tok_s": sum(got) / sec, "lengths_ok": got == want,
            "slot_util": useful / slot_steps if slot_steps else None, "first_call_s": first,
            "slot_steps": slot_steps, "useful_decode_tokens": useful, "tokens": sum(got),
            "seqs": len(got), "batches": len(spans)}


def rollout(device, small, iters=1, hf_batches=None, skip_hf=False):
    """Long-tailed rollout lengths: useful tokens/s and slot utilisation of meshrl's continuous
    batching, its static batching and transformers, and shared vs per-sample prefill."""
    from meshrl.engine.generation import FastGenerator, FastOptions
    from meshrl.engine.generation.sampling import SamplingParams
    case = ROLLOUT_SMALL if small else ROLLOUT
    if device.type == "cpu":  # a tiny model gains nothing from a second thread, and a busy host's
        torch.set_num_threads(1)  # other processes make threads wait on each other for seconds
    cfg = SMALL if small else BIG
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    slots, cap = case["slots"], case["cap"]
    prompts = prompts_for(case["prompts"], case["prompt_len"], cfg["vocab_size"], seed=case["seed"])
    # greedy, no EOS ids: each sequence runs to its limit, the drawn length
    params = SamplingParams(max_new_tokens=cap, greedy=True)
    print(f"rollout: {case['prompts']} prompts of {case['prompt_len']} tokens, {slots} slots, lengths "
          f"log-normal median {case['median']} sigma {case['sigma']} capped at {cap}, "
          f"k = {', '.join(map(str, case['ks']))}, {cfg['num_hidden_layers']} layers, "
          f"{str(dtype)[6:]}, decode chunks of {case['check_every']}", flush=True)
    stage = meshrl_stage(cfg, device, dtype)
    rows, draws = [], {}
    opts = dict(check_every=case["check_every"])
    for k in case["ks"]:
        n = case["prompts"] * k
        lengths = draw_lengths(n, case["median"], case["sigma"], cap, case["seed"] + k)
        mean = round(sum(lengths) / n)
        draws[k] = dict(mean=sum(lengths) / n, median=sorted(lengths)[n // 2], max=max(lengths),
                        at_cap=sum(x == cap for x in lengths), equal_length=mean,
                        util_bound=utilisation_bound(lengths, slots))
        print(f"k={k}: {n} sequences, lengths mean {draws[k]['mean']:.1f}, median "
              f"{draws[k]['median']}, max {draws[k]['max']} ({draws[k]['at_cap']} at the cap)",
              flush=True)
        for name, o, lim in [("meshrl continuous", dict(refill=True), lengths),
                             ("meshrl static", dict(refill=False), lengths),
                             (f"meshrl continuous, equal lengths ({mean})", dict(refill=True),
                              [mean] * n)]:
            gen = FastGenerator(stage, FastOptions(**opts, **o))
            rows.append(_meshrl_row(name, k, gen, prompts, params, slots, lim, device, iters))
            gen.release()
            print_table(rows[-1:], ROLLOUT_COLS)
        if not skip_hf:
            hf = _hf_model(cfg, device, dtype)
            flat = [p for p in prompts for _ in range(k)]  # prompt-major, as meshrl's sequences
            try:
                row = _hf_row(hf, flat, lengths, slots, device, hf_batches, iters)
            except Exception as exc:  # noqa: BLE001 - a baseline failure should not lose meshrl's rows
                print(f"transformers k={k}: failed: {exc!r:.500}", flush=True)
            else:
                rows.append({"case": "transformers generate, dynamic cache", "k": k, **row})
                print_table(rows[-1:], ROLLOUT_COLS)
            del hf
            _free(device)
    # prefill: one new token per sequence (limits all 1), the largest k, shared vs per sample
    k = max(case["ks"])
    ones = [1] * (case["prompts"] * k)
    for name, share in [("prefill only, shared prefixes", True),
                        ("prefill only, every sample prefills", False)]:
        gen = FastGenerator(stage, FastOptions(**opts, share_prefixes=share))
        row = _meshrl_row(name, k, gen, prompts, params, slots, ones, device, max(iters, 3))
        gen.release()
        row["slot_util"] = None  # no decode steps
        rows.append(row)
        print_table(rows[-1:], ROLLOUT_COLS)
    _rollout_ratios(rows)
    print()
    print_table(rows, ROLLOUT_COLS)
    goals = rollout_goals(rows, judged=device.type != "cpu" and not small, draws=draws)
    for line in goals["lines"]:
        print(line)
    extra = {"small": small, "layers": cfg["num_hidden_layers"], "dtype": str(dtype)[6:], **case,
             "ks": list(case["ks"]), "draws": draws, "hf_batches": hf_batches, "iters": iters,
             "goals": goals["values"]}
    stem = "generate-rollout-small" if small else "generate-rollout"
    print(f"wrote {write_results(stem, device, rows, extra)}")
    return 0


def _hf_model(cfg, device, dtype):
    import transformers
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **cfg, attn_implementation="sdpa", eos_token_id=EOS, pad_token_id=0))
    return model.to(dtype).eval()


def _rollout_ratios(rows):
    for r in rows:
        same_k = {x["case"]: x for x in rows if x["k"] == r["k"]}
        static = same_k.get("meshrl static")
        hf = same_k.get("transformers generate, dynamic cache")
        equal = next((x for c, x in same_k.items() if c.startswith("meshrl continuous, equal")), None)
        if r["case"].startswith("prefill only"):
            unshared = same_k.get("prefill only, every sample prefills")
            r["vs_unshared"] = unshared["seconds"] / r["seconds"] if unshared else None
            continue
        r["vs_static"] = r["useful_tok_s"] / static["useful_tok_s"] if static else None
        r["vs_hf"] = r["useful_tok_s"] / hf["useful_tok_s"] if hf else None
        r["vs_equal"] = r["useful_tok_s"] / equal["useful_tok_s"] if equal else None


def utilisation_bound(lengths, slots: int) -> float:
    """The most slot utilisation any engine decoding ``slots`` sequences at a time can reach on
    these lengths: the decode work W = Σ(L − 1) takes at least max(L) − 1 steps (the longest
    sequence's own, one after another) and at least W / slots, so W / (slots · that)."""
    work = sum(n - 1 for n in lengths)
    return work / (slots * max(max(lengths) - 1, -(-work // slots)))


def rollout_goals(rows, judged, draws=None):
    """The issue's goals as lines; met / NOT met where ``judged`` (the GPU case), figures only
    elsewhere. The long-tailed / equal-length line also gives the critical-path bound on that
    ratio (``utilisation_bound`` over the equal-length row's utilisation, for a decode step whose
    cost does not depend on how many slots are useful)."""
    lines, values = [], {}

    def line(label, value, goal, note=""):
        values[label] = dict(value=value, goal=goal, met=(value >= goal) if judged else None)
        verdict = ("met" if value >= goal else "NOT met") if judged else \
            "not judged (the goal is for the GPU case)"
        lines.append(f"goal {label} ≥ {goal:g}: {value:.3g} — {verdict}{note}")
    equal_util = {r["k"]: r["slot_util"] for r in rows if r["case"].startswith("meshrl continuous, equal")}
    for r in rows:
        if r["case"] == "meshrl continuous":
            if r.get("vs_equal") is not None:
                bound = (draws or {}).get(r["k"], {}).get("util_bound")
                note = (f" (critical-path bound {bound / equal_util[r['k']]:.3g}: the longest "
                        "sequence's steps)" if bound and equal_util.get(r["k"]) else "")
                line(f"k={r['k']} long-tailed / equal-length useful tokens/s", r["vs_equal"],
                     GOAL_VS_EQUAL, note)
            if r.get("vs_static") is not None:
                line(f"k={r['k']} continuous / static useful tokens/s", r["vs_static"], GOAL_VS_STATIC)
        if r["case"] == "prefill only, shared prefixes" and r.get("vs_unshared") is not None:
            line(f"k={r['k']} prefill time, per-sample / shared", r["vs_unshared"], GOAL_PREFILL)
    return {"lines": lines, "values": values}


def _free(device):
    gc.collect()
    if device.type != "cpu":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
