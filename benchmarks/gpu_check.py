"""Correctness of the CUDA-only branches, before any timing. One named check per line:

    ok   <name>: <measured error> | tol <tolerance> (<why>; the full reasoning sits beside each
    FAIL <name>: ...                             tolerance's constant below) | <seconds>
    skip (needs CUDA): <name>

Groups: the fast generator (CUDA graphs, torch.compile, Triton decode attention, cuBLASLt) against the
reference engine in fp32 and bf16; the flash varlen attention against SDPA, and model logits against
transformers; the Triton kernels at their GPU block sizes against the float64 oracles; a bf16 training
step against the fp32 one. On CPU everything that does not need CUDA runs as a smoke test (engines'
CPU paths, the kernels' torch paths at small sizes) and the rest prints a skip line; exit status 1
on any FAIL.

    PYTHONPATH=. python benchmarks/gpu_check.py            # everything (2–3 min expected on an H100)
    PYTHONPATH=. python benchmarks/gpu_check.py --list     # the check names
    PYTHONPATH=. python benchmarks/gpu_check.py -k kernel  # checks whose name contains a word
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import math
import os
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks.harness import bench_device  # noqa: E402
from benchmarks.generate import CHECK, _common_prefix, meshrl_stage, prompts_for  # noqa: E402
from meshrl.engine.generation import generate, stage_pass  # noqa: E402
from meshrl.engine.model import PackedMeta, build_stage  # noqa: E402
from meshrl.engine.generation.sampling import SamplingParams, filter_logits, gumbel_noise  # noqa: E402
from meshrl.parallel.layout import ParallelLayout  # noqa: E402

CHECKS = []  # (name, cuda_only, fn): fn() -> (ok, measured, tolerance)


def register(name, cuda_only=False):
    def deco(fn):
        CHECKS.append((name, cuda_only, fn))
        return fn
    return deco


class Ctx:
    device = torch.device("cpu")
    tmp = None

    @classmethod
    def cuda(cls):
        return cls.device.type == "cuda"


@functools.cache
def oracles():
    spec = importlib.util.spec_from_file_location("oracles", os.path.join(ROOT, "tests", "kernels", "oracles.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def tiny(kind):
    from meshrl.testing.tiny_models import make_tiny_hf
    return make_tiny_hf(kind, os.path.join(Ctx.tmp, kind),
                        seed={"llama": 1, "qwen2": 2, "mistral": 3, "qwen3_moe": 4, "mixtral": 5}[kind])


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


# ---- 1. fast generator vs reference engine --------------------------------------------------------
PROMPTS = dict(n=8, max_len=40, seed=1)
# eos 7 is sampled at step 0 of one prompt unless min_new_tokens bans it; these ids end some sequences
SAMPLED = dict(max_new_tokens=48, temperature=0.9, top_k=50, top_p=0.9, min_new_tokens=4,
               eos_ids=[7, 802], stop_ids=[11, 934, 755], seed=5)
GREEDY = dict(max_new_tokens=48, greedy=True)
# bf16: the engines round differently (fused QKV and gate/up GEMMs, rotary in fp32 registers in the
# Triton kernel against bf16 rotary in the reference, compiled fusions), so neither is "the" answer.
# Both are scored against the same model in fp32 (the bf16 weights upcast), teacher-forced on each
# engine's own tokens. This model's logits (|z| ≤ 4) come out of a bf16 forward within 0.055 of fp32
# for every token and position (CPU; 0.03–0.04 at the chosen tokens); 0.1 allows about 2×.
BF16_LP_TOL = 0.1
# Where the engines' tokens part (same context), the two tokens' fp32 scores (z/T, plus the shared
# Gumbel noise when sampling) must nearly tie: a rounding can move a difference of two logits by
# twice the per-logit error, so 2·BF16_LP_TOL/T. (A token that the fp32 top-k/top-p filter drops
# counts by its distance to the filter's edge.)
# Each divergence costs the rest of its sequence, and this model's logits are flat (a quarter of the
# positions have their top two within 0.05), so some sequences part; a broken engine parts within a
# few tokens everywhere. On CPU 82–89% of tokens stayed on the common prefix; half is the floor.
BF16_MIN_SHARE = 0.5


@functools.cache
def check_stage(dtype):
    """The generate.py check's model (4 layers, hidden 256, GQA 8/2, vocab 1000); its bf16 copy
    rounds the same host-seeded weights. ('fp32 of bf16': the bf16 weights upcast, the truth for
    scoring the bf16 engines.)"""
    if dtype == "fp32 of bf16":
        stage = meshrl_stage(CHECK, Ctx.device, torch.float32, seed=3)
        with torch.no_grad():
            for p in stage.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        return stage
    return meshrl_stage(CHECK, Ctx.device, dtype, seed=3)


@functools.cache
def reference_run(dtype, case):
    params = SamplingParams(**(GREEDY if case == "greedy" else SAMPLED))
    prompts = prompts_for(PROMPTS["n"], PROMPTS["max_len"], CHECK["vocab_size"], seed=PROMPTS["seed"], ragged=True)
    return prompts, params, generate(check_stage(dtype), prompts, params, seq_offset=2, engine="reference")


@functools.cache
def fast_generator(dtype, splits):
    """One generator per (dtype, splits), kept for the process: its greedy and sampled sessions live
    side by side (max_sessions 2), and each generator compiles its prefill pieces afresh."""
    from meshrl.engine.generation import FastGenerator, FastOptions
    # otherwise the defaults: CUDA graphs, torch.compile, Triton decode attention, cuBLASLt
    return FastGenerator(check_stage(dtype), FastOptions(attention_splits=splits))


def fast_run(dtype, case, splits=None):
    prompts, params, ref = reference_run(dtype, case)
    gen = fast_generator(dtype, splits)
    t0 = time.perf_counter()
    fast = gen.generate(prompts, params, seq_offset=2)
    path_ok, paths = engine_path(gen)
    paths += (f" attention={'triton' if Ctx.cuda() else 'torch'} blas={gen.opts.blas if Ctx.cuda() else '-'}"
              f" splits={splits or 'auto'} {time.perf_counter() - t0:.1f} s")
    return prompts, params, ref, fast, paths, path_ok


def engine_path(gen):
    """(whether the engine ran the path the check is about, its description): on CUDA the captured,
    compiled engine, so a fallback to eager is a failure."""
    bad = bool(Ctx.cuda() and not (gen.graphs and gen.compiled)
               or gen.compile_failed is not None or gen.capture_failed is not None)
    text = f"graphs={gen.graphs} compiled={gen.compiled}"
    if bad:
        text += f" compile_failed={gen.compile_failed!r:.200} capture_failed={gen.capture_failed!r:.200}"
    return not bad, text


def fp32_agreement(ref, fast):
    """(all tokens and finish reasons equal with |Δ log-prob| ≤ 1e-4 on the common prefixes, the
    measured figures as text)."""
    same = sum(a == b for a, b in zip(ref.output_ids, fast.output_ids))
    lp = max([abs(x - y) for a, b, r, f in zip(ref.logprobs, fast.logprobs, ref.output_ids, fast.output_ids)
              for x, y in zip(a[:_common_prefix(r, f)], b)] or [0.0])
    finish = ref.finish_reason == fast.finish_reason
    reasons = ",".join(sorted(set(ref.finish_reason)))
    ok = same == len(ref.output_ids) and finish and lp <= 1e-4
    return ok, (f"{same}/{len(ref.output_ids)} identical, finish {'equal' if finish else 'DIFFER'} "
                f"({reasons}), |Δ log-prob| {lp:.1e}")


def fastgen_fp32(case, splits=None):
    _, _, ref, fast, paths, path_ok = fast_run(torch.float32, case, splits)
    agree, text = fp32_agreement(ref, fast)
    return (path_ok and agree, f"{text} [{paths}]",
            "tokens and finish equal, |Δ log-prob| ≤ 1e-4 (fp32: the same sums in another order)")


def teacher_forced(stage, prompts, outputs, temperature):
    """fp32 logits / T [len(out), V] at each output position, prompt + output fed whole."""
    seqs = [p + o for p, o in zip(prompts, outputs)]
    meta = PackedMeta.from_lengths([len(s) for s in seqs], device=Ctx.device)
    ids = torch.tensor([t for s in seqs for t in s], device=Ctx.device)
    with torch.no_grad():
        z = stage.logits(stage_pass(stage, ids, meta))[:, :stage.cfg.vocab_size].double() / temperature
    starts = meta.cu_seqlens[:-1].tolist()
    return [z[s + len(p) - 1: s + len(p) - 1 + len(o)].cpu() for s, p, o in zip(starts, prompts, outputs)]


def lp_error(z, outputs, logprobs):
    err = 0.0
    for zi, o, lp in zip(z, outputs, logprobs):
        if o:
            want = torch.log_softmax(zi, -1).gather(1, torch.tensor(o)[:, None]).squeeze(1)
            err = max(err, float((torch.tensor(lp, dtype=torch.float64) - want).abs().max()))
    return err


def tie_gap(z, params, seq, step, a, b):
    """How far from a tie the fp32 scores of tokens a and b were where the engines parted."""
    if params.greedy:
        return abs(float(z[a] - z[b]))
    z = z.clone()
    if step < params.min_new_tokens:  # as sample_tokens: banned before the filters
        z[params.eos_ids + params.stop_ids] = float("-inf")
    scores = filter_logits(z[None], params.top_k, params.top_p)[0]
    noise = gumbel_noise(params.seed, torch.tensor([seq]), step, z.shape[0])[0]
    kept = torch.isfinite(scores)
    if kept[a] and kept[b]:
        return abs(float(z[a] + noise[a] - z[b] - noise[b]))
    edge = float(z[kept].min())  # a filter boundary: how far the dropped token was from the edge
    return max(edge - float(z[t]) for t in (a, b) if not kept[t])


def fastgen_bf16(case, splits=None):
    prompts, params, ref, fast, paths, path_ok = fast_run(torch.bfloat16, case, splits)
    truth, T = check_stage("fp32 of bf16"), params.logprob_temperature
    z_fast = teacher_forced(truth, prompts, fast.output_ids, T)
    err_fast = lp_error(z_fast, fast.output_ids, fast.logprobs)
    err_ref = lp_error(teacher_forced(truth, prompts, ref.output_ids, T), ref.output_ids, ref.logprobs)
    prefix = [_common_prefix(r, f) for r, f in zip(ref.output_ids, fast.output_ids)]
    share = sum(prefix) / max(1, sum(len(r) for r in ref.output_ids))
    gaps = [tie_gap(z_fast[i][n], params, i + 2, n, fast.output_ids[i][n], ref.output_ids[i][n])
            for i, n in enumerate(prefix) if n < min(len(ref.output_ids[i]), len(fast.output_ids[i]))]
    gap, tie_tol = max(gaps or [0.0]), 2 * BF16_LP_TOL / T
    ok = path_ok and err_fast <= BF16_LP_TOL and gap <= tie_tol and share >= BF16_MIN_SHARE
    return (ok, f"|log-prob − fp32| {err_fast:.3f} (reference engine {err_ref:.3f}), {len(gaps)} "
            f"divergences (widest fp32 gap {gap:.3f}), common prefix {share:.0%} [{paths}]",
            f"|log-prob − fp32| ≤ {BF16_LP_TOL}, gap ≤ {tie_tol:.3g}, prefix ≥ {BF16_MIN_SHARE:.0%} "
            "(bf16 rounding: parts only at near-ties)")


def continuous_fp32():
    """Continuous batching on the device: a third of the sequences' slots, refilled as they finish,
    3 samples per prompt sharing its prefill, per-sequence caps from 1 to max_new_tokens. Without
    top-p: on this case a cumulative mass within 1e-6 of top_p at one step flips a token with the
    batch's summation order in either engine (the reference's own static batches of 24 and of 6
    part there), which says nothing about the slots."""
    prompts, params, _ = reference_run(torch.float32, "sampled")
    params = dataclasses.replace(params, top_p=1.0)
    k = 3
    n = len(prompts) * k
    limits = [1 + (i * 7) % params.max_new_tokens for i in range(n)]
    ref = generate(check_stage(torch.float32), prompts, params, seq_offset=2, engine="reference",
                   samples=k, limits=limits)
    gen = fast_generator(torch.float32, None)
    fast = gen.generate(prompts, params, seq_offset=2, samples=k, slots=max(1, n // 3),
                        limits=limits)
    agree, text = fp32_agreement(ref, fast)
    path_ok, paths = engine_path(gen)  # captured here after admissions
    stats, every = gen.last_stats, k * sum(map(len, prompts))
    ok = path_ok and agree and stats["prefill_tokens"] < every
    return (ok, f"{text}, {stats['admissions']} admissions, {stats['prefill_tokens']} prompt tokens "
            f"prefilled of {every} [{paths}]",
            "tokens and finish equal, |Δ log-prob| ≤ 1e-4, samples share their prompts' prefill")


register("fastgen fp32 greedy = reference")(lambda: fastgen_fp32("greedy"))
register("fastgen fp32 sampled = reference")(lambda: fastgen_fp32("sampled"))
register("fastgen fp32 sampled, 2-way split attention = reference", cuda_only=True)(
    lambda: fastgen_fp32("sampled", splits=2))
register("fastgen fp32 continuous batching, shared prefixes = reference")(continuous_fp32)
register("fastgen bf16 greedy ~ reference")(lambda: fastgen_bf16("greedy"))
register("fastgen bf16 sampled ~ reference")(lambda: fastgen_bf16("sampled"))
register("fastgen bf16 greedy, 2-way split attention ~ reference", cuda_only=True)(
    lambda: fastgen_bf16("greedy", splits=2))


# ---- 2. flash varlen attention, model logits against transformers --------------------------------
@register("varlen flash op takes window_size", cuda_only=True)
def varlen_op():
    from meshrl.engine.model.attention import _varlen_kwargs_style
    style = _varlen_kwargs_style()
    ok = style is not None and style["window"]
    return ok, f"{style and {k: v for k, v in style.items() if k != 'fn'}}", \
        "window_size in torch.nn.attention.varlen.varlen_attn (else sliding windows fall back to SDPA; " \
        "without enable_gqa K/V heads are repeated)"


def varlen_vs_sdpa(window):
    """Packed ragged sequences (GQA 8/2, head dim 128), output and q/k/v gradients: flash varlen in
    bf16 and the per-sequence SDPA path in bf16, each against SDPA in fp32 on the same values."""
    from meshrl.engine.model.attention import _per_sequence_sdpa, varlen_causal_attention
    g = torch.Generator().manual_seed(0)
    lengths = [1, 7, 64, 200, 513, 3, 1000]
    n = sum(lengths)
    q, k, v = (torch.randn(n, h, 128, generator=g).to(torch.bfloat16) for h in (8, 2, 2))
    up = torch.randn(n, 8, 128, generator=g).to(Ctx.device)
    meta = PackedMeta.from_lengths(lengths, device=Ctx.device)

    def run(fn, dtype):
        xs = [t.to(Ctx.device, dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = fn(*xs)
        (out.float() * up).sum().backward()
        return [out.detach().float()] + [x.grad.float() for x in xs]

    want = run(lambda *x: _per_sequence_sdpa(*x, lengths, window), torch.float32)
    flash = run(lambda *x: varlen_causal_attention(*x, meta, window=window), torch.bfloat16)
    sdpa = run(lambda *x: _per_sequence_sdpa(*x, lengths, window), torch.bfloat16)
    names = ("out", "dq", "dk", "dv")
    e_flash = [float((a - w).abs().max() / w.abs().max()) for a, w in zip(flash, want)]
    e_sdpa = [float((a - w).abs().max() / w.abs().max()) for a, w in zip(sdpa, want)]
    ok = all(f <= 2 * s + 2 ** -8 for f, s in zip(e_flash, e_sdpa))
    # both round inputs, probabilities and outputs to bf16 in their own order: flash must be as
    # accurate as the bf16 SDPA it replaces
    return ok, ("max|Δ|/max|fp32|, flash vs SDPA bf16: " +
                ", ".join(f"{m} {f:.1e} vs {s:.1e}" for m, f, s in zip(names, e_flash, e_sdpa))), \
        "flash ≤ 2·SDPA(bf16) + 2^-8 (as accurate as the bf16 path it replaces)"


register("varlen flash bf16 ~ SDPA, causal (fwd+bwd)", cuda_only=True)(lambda: varlen_vs_sdpa(None))
register("varlen flash bf16 ~ SDPA, sliding window 64 (fwd+bwd)", cuda_only=True)(lambda: varlen_vs_sdpa(64))


def hf_logits(kind, dtype):
    import transformers
    path = tiny(kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(Ctx.device).eval()
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=path, dtype=dtype, device=Ctx.device)
    g = torch.Generator().manual_seed(0)
    lengths = [5, 40, 1, 17, 64]  # 40 and 64 pass mistral's window of 16
    ids = [torch.randint(0, 101, (n,), generator=g) for n in lengths]
    meta = PackedMeta.from_lengths(lengths, device=Ctx.device)
    with torch.no_grad():
        ours = stage.logits(stage_pass(stage, torch.cat(ids).to(Ctx.device), meta))[:, :101].float()
        ref = torch.cat([hf(i[None].to(Ctx.device)).logits[0].float() for i in ids])
    return ours, ref


def logits_fp32(kind):
    ours, ref = hf_logits(kind, torch.float32)
    err = float((ours - ref).abs().max())
    return err <= 1e-4, f"max |Δ logit| {err:.1e}", "1e-4 (fp32 both sides, sums in another order)"


def logits_bf16(kind):
    ours, hf16 = hf_logits(kind, torch.bfloat16)
    _, hf32 = hf_logits(kind, torch.float32)
    e_ours, e_hf = float((ours - hf32).abs().max()), float((hf16 - hf32).abs().max())
    ok = e_ours <= 2 * e_hf + 0.02
    # both bf16 with different kernels (flash varlen on CUDA): meshrl must be as close to the fp32
    # model as transformers in bf16 is
    return ok, f"max |Δ logit| to fp32: meshrl bf16 {e_ours:.3f}, transformers bf16 {e_hf:.3f} " \
               f"(to each other {float((ours - hf16).abs().max()):.3f})", \
        "meshrl ≤ 2·transformers + 0.02 (as close to fp32 as transformers in bf16)"


for _kind in ("llama", "qwen2", "mistral", "qwen3_moe", "mixtral"):
    register(f"logits {_kind} fp32 = transformers")(functools.partial(logits_fp32, _kind))
for _kind in ("llama", "qwen2", "mistral", "qwen3_moe", "mixtral"):
    register(f"logits {_kind} bf16 ~ transformers")(functools.partial(logits_bf16, _kind))


@register("MoE grouped GEMMs (bf16) ~ the expert loop", cuda_only=True)
def moe_grouped_vs_loop():
    """The sparse layers' grouped GEMMs (torch._grouped_mm, CUDA's bf16 default) against the loop,
    outputs and gradients, on the tiny Qwen3-MoE."""
    from meshrl.engine.model.moe import SparseMoE
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 101, (96,), generator=g).to(Ctx.device)
    meta = PackedMeta.from_lengths([40, 1, 55], device=Ctx.device)
    out = {}
    for grouped in (False, True):
        stage = build_stage(ParallelLayout(ranks=[0]), model_dir=tiny("qwen3_moe"),
                            dtype=torch.bfloat16, device=Ctx.device)
        for layer in stage.model.layers.values():
            if isinstance(layer.feed_forward, SparseMoE):
                layer.feed_forward.grouped = grouped
        h = stage(ids, meta)
        h.float().square().mean().backward()
        grads = torch.cat([p.grad.float().flatten() for p in stage.parameters()])
        out[grouped] = (h.detach().float(), grads)
    e_out = float((out[True][0] - out[False][0]).abs().max())
    cos = cosine(out[True][1], out[False][1])
    return (e_out <= 0.05 and cos >= 0.999, f"max |Δ hidden| {e_out:.3f}, gradient cosine {cos:.6f}",
            "|Δ| ≤ 0.05 (bf16 sums in another order), cosine ≥ 0.999")


def moe_fast_vs_reference(decode):
    """The fast engine on the tiny Mixtral, fp32: its default decode (sparse, not captured) or the
    captured static step (every local expert on every slot), against the reference engine."""
    from meshrl.engine.generation import FastGenerator, FastOptions
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=tiny("mixtral"), device=Ctx.device)
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11, 12], [1], [20, 21, 22, 23]]
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=50, eos_ids=[2], seed=5)
    ref = generate(stage, prompts, params, engine="reference")
    static = decode == "static"
    gen = FastGenerator(stage, FastOptions(expert_decode=decode,
                                           cuda_graphs=static and Ctx.cuda() or None))
    fast = gen.generate(prompts, params, slots=2)
    agree, text = fp32_agreement(ref, fast)
    captured = gen.graphs and gen.capture_failed is None
    ok = agree and gen.compile_failed is None and (captured if static and Ctx.cuda() else True)
    return (ok, f"{text} [graphs={gen.graphs} compiled={gen.compiled}]",
            "tokens and finish equal, |Δ log-prob| ≤ 1e-4" + (", captured" if static else ""))


register("MoE fastgen fp32, sparse decode = reference")(lambda: moe_fast_vs_reference("sparse"))
register("MoE fastgen fp32, captured static decode = reference", cuda_only=True)(
    lambda: moe_fast_vs_reference("static"))


@register("greedy generation = transformers (fp32, llama)")
def greedy_vs_hf():
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny("llama")).to(Ctx.device).eval()
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=tiny("llama"), device=Ctx.device)
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11, 12], [1]]
    r = generate(stage, prompts, SamplingParams(max_new_tokens=12, greedy=True, eos_ids=[2]))
    ref = [hf.generate(torch.tensor([p], device=Ctx.device), max_new_tokens=12, do_sample=False,
                       eos_token_id=2, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    same = sum(a == b for a, b in zip(r.output_ids, ref))
    return same == len(prompts), f"{same}/{len(prompts)} identical", \
        "identical (fp32 greedy, the default engine: fast on CUDA)"


# ---- 3. kernels at their dispatch defaults against the float64 oracles ----------------------------
def within(got, want, atol, rtol):
    """(worst |Δ| / (atol + rtol·|want|), max |Δ|): the first ≤ 1 passes (oracles.assert_within)."""
    want = want.detach().double()  # on the oracle's device: a 128256×2048 gradient stays on the GPU
    got = got.detach().to(want.device).double()
    if torch.isnan(got).any() or got.shape != want.shape:
        return math.inf, math.inf
    diff = (got - want).abs()
    return float((diff / (atol + rtol * want.abs())).max()), float(diff.max())


def verdict(parts):
    """parts: [(label, (ratio, max_abs))] -> (ok, measured)."""
    ok = all(r <= 1 for _, (r, _) in parts)
    return ok, ", ".join(f"{n} {a:.1e} ({r:.2f} of tol)" for n, (r, a) in parts)


def rows(gpu, cpu):
    return gpu if Ctx.cuda() else cpu


# tests/kernels/test_logprobs.py: outputs are fp32 from fp32 arithmetic on the exact input values (the
# oracle reads the same rounded bf16), so only a few fp32 roundings of V-term sums separate them;
# gradients come back in the logits' dtype: ~1e-6 relative in fp32, one bf16 rounding (≤ 2^-9,
# 2^-8 with the fp32 error on top) in bf16.
LP_OUT_TOL = dict(atol=5e-5, rtol=1e-5)
# (TRITON_INTERPRET=1 MESHRL_KERNELS=triton runs the Triton kernels here on CPU tensors; the
# interpreter truncates fp32 to bf16, a whole ulp: 2^-7, as in tests/kernels/interpret_cases.py.)
LP_GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-4), torch.bfloat16: dict(
    atol=1e-6, rtol=2 ** -7 if os.environ.get("TRITON_INTERPRET") == "1" else 2 ** -8)}


def logprobs_case(dtype, v, vocab_size=None, temperature=1.0):
    from meshrl.kernels import token_logprobs
    n = rows(333, 4)
    g = torch.Generator().manual_seed(v)
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype)
    labels = torch.randint(0, vocab_size or v, (n,), generator=g)
    up_lp, up_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    x = logits.to(Ctx.device, copy=True).requires_grad_()  # the oracle reads `logits` untouched
    lp, ent = token_logprobs(x, labels.to(Ctx.device), temperature=temperature, return_entropy=True,
                             vocab_size=vocab_size)
    (lp * up_lp.to(Ctx.device) + ent * up_ent.to(Ctx.device)).sum().backward()
    o_lp, o_ent, o_grad = oracles().logprob_oracle_analytic(logits, labels, up_lp, up_ent, temperature,
                                                            vocab_size)
    ok, measured = verdict([("logp", within(lp, o_lp, **LP_OUT_TOL)), ("entropy", within(ent, o_ent, **LP_OUT_TOL)),
                            ("grad", within(x.grad, o_grad, **LP_GRAD_TOL[dtype]))])
    ok &= x.grad.dtype == dtype
    gt = LP_GRAD_TOL[dtype]
    return ok, f"{n}×{v} max|Δ| {measured}", \
        f"out 5e-5 + 1e-5·|x|, grad {gt['atol']:g} + {gt['rtol']:.2g}·|x| (fp32 sums; grad rounded to {str(dtype)[6:]})"


for _dt in (torch.float32, torch.bfloat16):
    _n = str(_dt)[6:]
    register(f"token_logprobs {_n} V=32000 (fwd+bwd, logp+entropy)")(functools.partial(logprobs_case, _dt, 32000))
    register(f"token_logprobs {_n} V=128256 (fwd+bwd, logp+entropy)")(functools.partial(logprobs_case, _dt, 128256))
    register(f"token_logprobs {_n} V=50257 of 50304 columns, T=0.7 (fwd+bwd)")(
        functools.partial(logprobs_case, _dt, 50304, 50257, 0.7))


# fp32: the H-term matmuls round in fp32 (test_linear_logprobs.py's tolerances). bf16: the logits
# chunk is rounded to bf16 (2^-9 relative of |z| ≲ 12 here: ≤ 0.03, a logp carries two such errors:
# test_linear_logprobs.py's 6e-2). That rounding moves each softmax probability by up to |z|·2^-9 ≈ 2%
# relative, and every gradient element sums such probabilities times inputs, then is rounded to bf16:
# errors follow the largest terms, so the bound is relative to the gradient's largest magnitude:
# 2^-5 (3%) of it plus 2^-7 of the element (CPU torch path at these sizes, V=32000: 1.1% and 0.9%).
LIN_TOL = {torch.float32: dict(out=dict(atol=1e-4, rtol=1e-5), grad=(1e-4, 1e-4)),
           torch.bfloat16: dict(out=dict(atol=6e-2, rtol=1e-2), grad=(2 ** -5, 2 ** -7))}


def linear_case(dtype, v):
    from meshrl.kernels import linear_token_logprobs
    n, h = rows(300, 4), rows(2048, 32)
    g = torch.Generator().manual_seed(v + 1)
    hidden = torch.randn(n, h, generator=g).to(dtype).to(Ctx.device)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5 * 2).to(dtype).to(Ctx.device)
    labels = torch.randint(0, v, (n,), generator=g).to(Ctx.device)
    up = [torch.randn(n, generator=g).to(Ctx.device), torch.randn(n, generator=g).to(Ctx.device)]
    hx, wx = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = linear_token_logprobs(hx, wx, labels, temperature=0.9, return_entropy=True)
    (lp * up[0] + ent * up[1]).sum().backward()
    o = oracles()
    (o_lp, o_ent), (o_gh, o_gw) = o.oracle_grads(lambda a, b: o.logprob_oracle(a @ b.T, labels, 0.9),
                                                 [hidden, weight], up)
    tol = LIN_TOL[dtype]
    rel, rt = tol["grad"]
    parts = [("logp", within(lp, o_lp, **tol["out"])), ("entropy", within(ent, o_ent, **tol["out"])),
             ("d hidden", within(hx.grad, o_gh, rel * float(o_gh.abs().max()), rt)),
             ("d weight", within(wx.grad, o_gw, rel * float(o_gw.abs().max()), rt))]
    del o_gw
    ok, measured = verdict(parts)
    out = tol["out"]
    return ok, f"{n}×{h}→{v} max|Δ| {measured}", \
        f"out {out['atol']:g} + {out['rtol']:g}·|x|, grads {rel:.2g}·max|grad| + {rt:.2g}·|x| (see LIN_TOL)"


for _dt in (torch.float32, torch.bfloat16):
    for _v in (32000, 128256):
        register(f"linear_token_logprobs {str(_dt)[6:]} V={_v} (fwd+bwd, T=0.9)")(
            functools.partial(linear_case, _dt, _v))


def gae_case(dtype):
    from meshrl.kernels import gae
    g = torch.Generator().manual_seed(0)
    lens = [1, 5, 0, 4000, 3, 70] + torch.randint(1, 300, (64,), generator=g).tolist()
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    n = sum(lens)
    r, v = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    boot = torch.randn(len(lens), generator=g).to(dtype)
    parts, fp32_out = [], True
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95)):
        adv, ret = gae(r.to(Ctx.device), v.to(Ctx.device), cu.to(Ctx.device),
                       bootstrap_values=boot.to(Ctx.device), gamma=gamma, lam=lam)
        fp32_out &= adv.dtype == ret.dtype == torch.float32
        o_adv, o_ret = oracles().gae_oracle(r, v, cu, boot, gamma, lam)
        tol = 2e-6 * max(1.0, float(o_ret.abs().max())) + 1e-6
        parts += [(f"adv γ={gamma} λ={lam}", within(adv, o_adv, tol, 0)),
                  (f"ret γ={gamma} λ={lam}", within(ret, o_ret, tol, 0))]
    ok, measured = verdict(parts)
    # the oracle reads the same rounded inputs: only fp32 accumulation over ≤ 4000 terms differs
    return ok and fp32_out, f"{len(lens)} sequences (0, 1, 4000 tokens) max|Δ| {measured}", \
        "2e-6·max(1, max|returns|) + 1e-6 (fp32 accumulation, tests/kernels/test_gae.py)"


register("gae fp32 ragged, bootstrap")(functools.partial(gae_case, torch.float32))
register("gae bf16 ragged, bootstrap")(functools.partial(gae_case, torch.bfloat16))


# ---- 4. training step ------------------------------------------------------------------------------
def train_step(device, dtype, *, round_to_bf16=False):
    """One Trainer step (AdamW on fp32 master weights) of the tiny qwen2 on two microbatches of
    packed ragged sequences: (loss, flat fp32 masters before, after, grads)."""
    from meshrl.engine.algorithms.calls import sft_call
    from meshrl.engine.batch import pack
    from meshrl.engine.train import OptimConfig, Trainer, global_token_count
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=tiny("qwen2"), dtype=dtype, device=device)
    if round_to_bf16:  # the fp32 run starts from the bf16 run's values, so updates compare
        with torch.no_grad():
            for p in stage.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    trainer = Trainer(stage, OptimConfig(lr=1e-3, eps=TRAIN_EPS, max_grad_norm=1.0))
    before = trainer.opt.master.clone()
    g = torch.Generator().manual_seed(1)
    mbs = [pack([torch.randint(3, 101, (n,), generator=g).tolist() for n in (7, 12, 30, 64)]),
           pack([torch.randint(3, 101, (n,), generator=g).tolist() for n in (5, 9, 120)])]
    m = trainer.step(mbs, sft_call(global_token_count(mbs, stage.layout)))
    return m["loss"], before.cpu(), trainer.opt.master.cpu(), trainer.opt.grads.data.cpu()


@register("train step fp32 cpu = gpu", cuda_only=True)
def train_cpu_vs_gpu():
    (l0, _, p0, _), (l1, _, p1, _) = (train_step(d, torch.float32) for d in (torch.device("cpu"), Ctx.device))
    err = float((p0 - p1).abs().max())
    return abs(l0 - l1) < 1e-4 and err < 1e-4, f"loss {l0:.6f} vs {l1:.6f}, max |Δ param| {err:.1e}", \
        "1e-4 on loss and parameters (fp32 both, sums in another order)"


# The loss is a token mean of log-probs, each off by a few bf16 roundings in no common direction: the
# mean keeps less than one rounding's relative error (2^-8 ≈ 4e-3). Measured on CPU: 3e-4.
BF16_LOSS_RTOL = 5e-3
# bf16 activations move the gradient by ~6% of its norm (CPU: cosine 0.998). AdamW's first step is
# lr·g/(|g| + eps): with eps ≪ |g| that is lr·sign(g), every element weighs alike and the ~1.7% of
# elements whose gradient is within bf16 noise of zero flip at random (cosine 0.97 at eps 1e-8 on
# CPU: the optimizer's arithmetic, not a bf16 defect). eps near the gradients' scale (RMS 2.5e-3)
# keeps small elements proportional to g, so the updates compare as the gradients do (CPU: 0.997).
TRAIN_EPS = 1e-3
BF16_COS = 0.99


@register("train step bf16 ~ fp32 (fp32 master weights)")
def train_bf16_vs_fp32():
    l16, b16, a16, g16 = train_step(Ctx.device, torch.bfloat16)
    l32, b32, a32, g32 = train_step(Ctx.device, torch.float32, round_to_bf16=True)
    rel = abs(l16 - l32) / abs(l32)
    u16, u32 = a16 - b16, a32 - b32
    cos_u, cos_g = cosine(u16, u32), cosine(g16, g32)
    flips = float((u16.sign() != u32.sign()).double().mean())
    ok = rel <= BF16_LOSS_RTOL and cos_u >= BF16_COS and cos_g >= BF16_COS and bool((b16 == b32).all())
    return ok, (f"loss {l16:.5f} vs {l32:.5f} (rel {rel:.1e}), cosine of updates {cos_u:.4f}, of "
                f"gradients {cos_g:.4f}, {flips:.1%} of updates change sign"), \
        (f"loss rel ≤ {BF16_LOSS_RTOL:g}, cosines ≥ {BF16_COS} at AdamW eps {TRAIN_EPS:g} (bf16 "
         "rounding; eps at the gradients' scale, see TRAIN_EPS)")


# ---- running -------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="print the check names and exit")
    p.add_argument("-k", default="", help="run only the checks whose name contains this")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(name for name, _, _ in CHECKS))
        return 0
    Ctx.device = bench_device()
    print("device:", Ctx.device, torch.cuda.get_device_name(Ctx.device) if Ctx.cuda() else "", flush=True)
    fails, t_start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as Ctx.tmp:
        for name, cuda_only, fn in CHECKS:
            if args.k not in name:
                continue
            if cuda_only and not Ctx.cuda():
                print(f"skip (needs CUDA): {name}", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                ok, measured, tol = fn()
            except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
                traceback.print_exc()
                ok, measured, tol = False, f"raised {exc!r:.300}", "-"
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {measured} | tol {tol} | {time.perf_counter() - t0:.1f} s",
                  flush=True)
            if not ok:
                fails.append(name)
    total = f"in {time.perf_counter() - t_start:.0f} s"
    print(f"FAILED {len(fails)}: " + "; ".join(fails) + f" ({total})" if fails else f"all checks passed ({total})")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
