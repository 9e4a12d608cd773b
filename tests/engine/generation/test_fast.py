"""Fast generation equals the reference engine (tokens identical, log-probs to fp32 rounding) in one
process and at tp=2, pp=2, tp2×pp2; sharded sampling equals ``sample_tokens`` on gathered logits; the
decode loop reads the device at most once per ``check_every`` steps; the engine runs the Triton
decode attention (interpreted) with the reference's outputs. The kernel itself is tested in
tests/kernels/test_decode_attention.py."""
import os

import pytest
import torch

from meshrl.engine.generation import FastGenerator, FastOptions, generate, generate_fast
from meshrl.engine.generation.sampling import (
    SamplingParams,
    gumbel_noise,
    sample_tokens,
)
from meshrl.engine.generation.schedule import Schedule
from meshrl.engine.generation.shard_sampling import Sampler, gumbel_columns, noise_keys
from meshrl.engine.model import build_stage
from meshrl.engine.model.attention import rope_cos_sin
from meshrl.parallel.layout import ParallelLayout
from meshrl.parallel.sharding import padded_size
from meshrl.testing.tiny_models import make_tiny_hf
from meshrl.testing.triton_interpreter import run_interpreted

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
PROMPTS = [[3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14], [1], [20, 21], [30, 31, 32, 33, 34]]
# Stop ids 5/6/7 end some sampled sequences early; check_every 64 exceeds every generation here.
CASES = [
    (SamplingParams(max_new_tokens=10, greedy=True, eos_ids=[2]), 4),
    (SamplingParams(max_new_tokens=12, temperature=0.8, top_k=30, top_p=0.95, eos_ids=[2], seed=7), 3),
    (SamplingParams(max_new_tokens=30, temperature=1.3, top_p=0.9, min_new_tokens=4, eos_ids=[2],
                    stop_ids=[5, 6, 7], seed=3), 64),
    (SamplingParams(max_new_tokens=9, temperature=0.7, top_k=5, min_new_tokens=2, eos_ids=[2],
                    stop_ids=[6], seed=1), 2),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("fastgen")
    return {kind: make_tiny_hf(kind, str(d / kind), seed=2) for kind in ("llama", "mistral", "qwen2", "qwen3")}


def _same(ref, got, where=""):
    assert got.output_ids == ref.output_ids, f"tokens differ {where}"
    assert got.finish_reason == ref.finish_reason, f"finish reasons differ {where}"
    for a, b in zip(ref.logprobs, got.logprobs):
        # fp32 both sides; the step differs from the stage forward only in summation order. With
        # the tiny models' 0.2 init (logits up to |6.5|) the measured max |diff| is 1.65e-5 (llama,
        # case 3; about 35 fp32 ulps of the largest logit): 3e-5 allows about 2x
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=3e-5, rtol=0), where


def _both(stage, prompts, params, every, offset=0, **opts):
    ref = generate(stage, prompts, params, seq_offset=offset, engine="reference")
    got = generate_fast(stage, prompts, params, seq_offset=offset,
                        options=FastOptions(check_every=every, **opts))
    return ref, got


def test_matches_reference_single_process(models):
    layout = ParallelLayout(ranks=[0])
    for kind, path in models.items():  # llama3 rope; mistral sliding window 16; qwen2 bias + tied
        stage = build_stage(layout, model_dir=path)
        for i, (params, every) in enumerate(CASES):
            _same(*_both(stage, PROMPTS, params, every, offset=11), f"{kind} case {i}")
        # the prefill through the stage's own forward (the option the benchmark compares)
        _same(*_both(stage, PROMPTS, *CASES[1], prefill_pieces=False), f"{kind} stage prefill")


def test_engine_choice(models, monkeypatch):
    from meshrl.engine.generation import choose_engine
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=models["llama"])
    assert choose_engine(stage) == "reference"  # auto: the fast engine on CUDA only
    monkeypatch.setenv("MESHRL_GENERATE", "fast")
    assert choose_engine(stage) == "fast" and choose_engine(stage, "reference") == "reference"
    with pytest.raises(ValueError, match="use one of"):
        choose_engine(stage, "turbo")


def test_generator_reuses_session_and_sees_weight_updates(models):
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=models["llama"])
    gen = FastGenerator(stage, FastOptions(check_every=4))
    params = CASES[1][0]
    first = gen.generate(PROMPTS, params)
    sess = next(iter(gen._sessions.values()))
    other = [[9] * 7, [1, 2], [4, 4, 4], [50], [60, 61]]
    _same(generate(stage, other, params, engine="reference"), gen.generate(other, params))
    assert next(iter(gen._sessions.values())) is sess  # same batch and settings: same buffers
    with torch.no_grad():  # an optimizer step in place: fused Q/K/V and gate/up are refreshed
        for name, p in stage.named_parameters():
            if "q_proj" in name or "up_proj" in name:
                p.add_(0.05 * torch.randn_like(p))
    changed = gen.generate(PROMPTS, params)
    _same(generate(stage, PROMPTS, params, engine="reference"), changed)
    assert changed.output_ids != first.output_ids
    gen.release()
    assert not gen._sessions


def test_generator_block_keeps_one_session_for_many_batches(models, monkeypatch):
    from meshrl.engine.generation import generator
    monkeypatch.setenv("MESHRL_GENERATE", "fast")
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=models["llama"])
    params = CASES[1][0]
    other = [[9] * 7, [1, 2], [4, 4, 4], [50], [60, 61]]
    tail = PROMPTS[:2]
    with generator(stage) as gen:
        fast = gen.__self__
        got = [gen(PROMPTS, params, seq_offset=0), gen(other, params, seq_offset=5)]
        assert isinstance(fast, FastGenerator) and len(fast._sessions) == 1
        full = next(iter(fast._sessions.values()))
        got.append(gen(tail, params, seq_offset=10))  # a smaller last batch: its own session...
        assert len(fast._sessions) == 1 and next(iter(fast._sessions.values())) is not full
    assert not fast._sessions  # ...in place of the full one; all released on leaving the block
    for prompts, offset, g in zip((PROMPTS, other, tail), (0, 5, 10), got):
        _same(generate(stage, prompts, params, seq_offset=offset, engine="reference"), g)


def test_compile_failure_falls_back_to_eager_pieces(models):
    from meshrl.engine.generation.step import StepFns

    def broken(*args, **kwargs):
        raise RuntimeError("inductor could not lower this")
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=models["llama"])
    gen = FastGenerator(stage)
    gen.compiled, gen.fns = True, StepFns(pre=broken)  # as if torch.compile had been chosen
    params = CASES[0][0]
    with pytest.warns(UserWarning, match="torch.compile failed"):
        got = gen.generate(PROMPTS, params)
    assert isinstance(gen.compile_failed, RuntimeError) and not gen.compiled
    ref = generate(stage, PROMPTS, params, engine="reference")
    _same(ref, got)
    gen = FastGenerator(stage)  # the prefill's pieces (compiled for any row count) fail alike
    gen.prefill_fns = StepFns(pre=broken)
    with pytest.warns(UserWarning, match="failed in the prefill"):
        _same(ref, gen.generate(PROMPTS, params))
    assert isinstance(gen.compile_failed, RuntimeError)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
    gen = FastGenerator(stage)  # running out of memory is no compile failure: it is raised
    gen.prefill_fns = StepFns(pre=out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        gen.generate(PROMPTS, params)
    assert gen.compile_failed is None
    # the warm-up a compiled (or captured) session runs first advances the state; it is restored
    gen = FastGenerator(stage)
    gen.compiled = True
    _same(ref, gen.generate(PROMPTS, params))
    assert next(iter(gen._sessions.values())).prepared


def test_compiled_pieces_match_reference(models):
    # The GPU runs torch.compile'd pieces (layers, rotary tables, sampling, bookkeeping with its
    # in-place writes); inductor's CPU backend compiles the same graphs, so they are checked here.
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=models["qwen2"])
    gen = FastGenerator(stage, FastOptions(compile=True, check_every=4))
    for params, _ in CASES[:2]:
        _same(generate(stage, PROMPTS, params, engine="reference"), gen.generate(PROMPTS, params))
    other = [[9] * 7, [1, 2], [4, 4, 4, 4], [50], [60, 61]]  # another prefill row count: symbolic
    _same(generate(stage, other, CASES[0][0], engine="reference"), gen.generate(other, CASES[0][0]))
    assert gen.compiled and gen.compile_failed is None


def test_prefill_and_decode_compilations_count_apart():
    # torch.compile counts recompilations per code object; the prefill's pieces (a static entry,
    # then one with the row count symbolic) are copies with their own, so they never use up the
    # decode step's budget (one entry per shape).
    import torch._dynamo

    from meshrl.engine.generation.step import StepFns
    torch._dynamo.reset()
    inv_freq = torch.rand(4)
    with torch._dynamo.config.patch(recompile_limit=2):
        decode, prefill = StepFns.compiled(), StepFns.compiled(prefill=True)
        for n in (5, 9, 13, 17):  # two entries at most, whatever the row counts
            prefill.rope(inv_freq, torch.arange(n), torch.float32)
        for n in (2, 3):  # two static shapes: the limit, reached only if nothing else counted
            cos, sin = decode.rope(inv_freq, torch.arange(n), torch.float32)
    want = rope_cos_sin(inv_freq, torch.arange(3), torch.float32)
    assert torch.allclose(cos, want[0]) and torch.allclose(sin, want[1])


def _distributed_case(path, tp, pp, prompt_sets):
    import torch.distributed as dist
    layout = ParallelLayout(ranks=list(range(dist.get_world_size())), tp=tp, pp=pp, dp=1)
    stage = build_stage(layout, model_dir=path)
    out = []
    for prompts in prompt_sets:
        for params, every in CASES:
            ref, got = _both(stage, prompts, params, every, offset=5)
            out.append((ref, got))
    return out


@pytest.mark.parametrize("world,tp,pp", [(2, 2, 1), (2, 1, 2), (4, 2, 2)])
def test_matches_reference_distributed(dist_pool, models, world, tp, pp):
    # pp: 5 rows in 2 ragged microbatches, 1 row (fewer microbatches than stages), 2 rows
    prompt_sets = [PROMPTS, [PROMPTS[1]], PROMPTS[:2]] if pp > 1 else [PROMPTS]
    layout1 = ParallelLayout(ranks=[0])
    single = build_stage(layout1, model_dir=models["llama"])
    results = dist_pool(world).run(_distributed_case, models["llama"], tp, pp, prompt_sets)
    expected = [generate(single, ps, params, seq_offset=5, engine="reference")
                for ps in prompt_sets for params, _ in CASES]
    for rank, res in enumerate(results):  # every rank returns the same result
        for i, ((ref, got), exp) in enumerate(zip(res, expected)):
            _same(ref, got, f"rank {rank} case {i} tp={tp} pp={pp}")
            assert got.output_ids == exp.output_ids, f"layout changed tokens, case {i}"


def _sharded_sampling(cases, steps, first_seq):
    import torch.distributed as dist
    tp, r = dist.get_world_size(), dist.get_rank()
    out = []
    for logits, params in cases:
        vocab = logits.shape[1]
        width = padded_size(vocab, tp) // tp
        shard = torch.full((logits.shape[0], width), 1e4)  # padding must never win
        cols = logits[:, r * width:(r + 1) * width]
        shard[:, :cols.shape[1]] = cols
        keys = noise_keys(params.seed, torch.arange(first_seq, first_seq + logits.shape[0]))
        sampler = Sampler(params, vocab, r * width, width, dist.group.WORLD, logits.device)
        out += [sampler(shard, keys, torch.tensor(step)) for step in steps]
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_sampling_equals_gathered(dist_pool, world):
    g = torch.Generator().manual_seed(world)
    logits = torch.randn(6, 103, generator=g) * 3  # 103 columns: padded to 104 at tp=4
    banned = logits.clone()
    banned[:, [7, 8, 50]] = 20.0  # the banned ids are the favourites, so the ban changes tokens
    cases = [(logits, SamplingParams(greedy=True)),
             (logits, SamplingParams(temperature=0.7, seed=123)),
             (logits, SamplingParams(top_k=5, seed=4)),
             (logits, SamplingParams(top_k=5, top_p=0.8, seed=5)),
             (logits, SamplingParams(top_p=0.9, temperature=1.5, seed=6)),
             (logits, SamplingParams(top_k=40, top_p=0.95, seed=7)),  # k above a shard's width
             (logits, SamplingParams(top_k=500, seed=8)),  # k above the vocabulary: no filter
             (banned, SamplingParams(greedy=True, min_new_tokens=2, eos_ids=[7], stop_ids=[50])),
             (banned, SamplingParams(top_k=3, min_new_tokens=2, eos_ids=[7, 8], seed=9))]
    steps = [0, 1, 5]
    results = dist_pool(world).run(_sharded_sampling, cases, steps, 40)
    i = 0
    for x, params in cases:
        ban = sorted(set(params.eos_ids) | set(params.stop_ids))
        for step in steps:
            ref_tok, ref_logp = sample_tokens(x, params, torch.arange(40, 46), step,
                                              ban_ids=ban if step < params.min_new_tokens else None)
            for rank in range(world):
                tok, logp = results[rank][i]
                assert torch.equal(tok, ref_tok), f"{params} step {step} rank {rank}"
                assert torch.allclose(logp, ref_logp, atol=1e-5, rtol=0)
            i += 1


def test_noise_on_a_column_range_is_bitwise_gumbel_noise():
    seq = torch.tensor([0, 7, 123456])
    full = gumbel_noise(99, seq, 17, 300)
    cols = torch.arange(120, 250)
    part = gumbel_columns(noise_keys(99, seq), torch.tensor(17), (cols * 0x2C1B3C6D) & 0xFFFFFFFF)
    assert torch.equal(part, full[:, 120:250])


def test_host_reads_at_most_one_per_check_interval(models, monkeypatch):
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=models["llama"])
    gen = FastGenerator(stage, FastOptions(check_every=8))
    count = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **kw):
            count["n"] += 1
            return _orig(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads(n_new):
        params = SamplingParams(max_new_tokens=n_new, temperature=0.9, top_k=20, seed=1)
        gen.generate(PROMPTS, params)  # first call per length: session set-up outside the count
        before = count["n"]
        gen.generate(PROMPTS, params)
        return count["n"] - before
    short, long = reads(9), reads(89)
    monkeypatch.undo()
    # 80 more decode steps cost at most 80 / 8 more reads (the termination checks)
    assert long - short <= 10, (short, long)
    sess = next(reversed(gen._sessions.values()))
    ptrs = [t.data_ptr() for t in vars(sess.state).values()] + [sess.lengths.data_ptr()]
    gen.generate(PROMPTS, SamplingParams(max_new_tokens=89, temperature=0.9, top_k=20, seed=1))
    assert ptrs == [t.data_ptr() for t in vars(sess.state).values()] + [sess.lengths.data_ptr()]


def test_schedule_feeds_every_item_once_and_exchanges_match():
    for pp in (1, 2, 3, 4):
        for m in range(1, pp + 1):
            for steps in (0, 1, 2, 5):
                s = Schedule(pp, m, steps)
                seen = {}
                for t in range(s.ticks + 2):
                    for st in range(pp):
                        it = s.item(t, st)
                        if it:
                            assert (st, it.m, it.j) not in seen
                            seen[(st, it.m, it.j)] = t
                assert len(seen) == pp * m * steps
                for (st, mb, j), t in seen.items():  # inputs arrive exactly one tick earlier
                    if st > 0:
                        assert seen[(st - 1, mb, j)] == t - 1
                    elif j > 1:
                        assert seen[(pp - 1, mb, j - 1)] == t - 1
                for t in range(s.ticks):
                    sends = {(k, st, mb) for st in range(pp) for k, d, mb in s.transfers(t, st)
                             if d == "send"}
                    recvs = {(k, st - 1 if k == "hidden" else pp - 1, mb) for st in range(pp)
                             for k, d, mb in s.transfers(t, st) if d == "recv"}
                    assert sends == recvs


@pytest.mark.skipif(not INTERPRETING, reason="run by test_engine_with_triton_attention_interpreted")
@pytest.mark.parametrize("kind,compiled", [("mistral", False), ("mistral", True), ("qwen3", False)])
def test_interpreted_engine_with_triton_attention(models, kind, compiled):
    # The kernel rotates q and k, so the (compiled, on GPU) layer pieces hand them over unrotated
    # (after qwen3's q/k norms; its head_dim of 24 is a masked 32-wide block in the kernel).
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=models[kind])
    # 8 + 10 positions pass mistral's window of 16; the interpreter costs ~10 ms per program
    params = SamplingParams(max_new_tokens=10, temperature=1.3, top_p=0.9, seed=3)
    prompts = [PROMPTS[1], PROMPTS[4]]
    ref = generate(stage, prompts, params, engine="reference")
    # the compiled run also splits each (sequence, KV head) across 3 programs
    opts = FastOptions(attention="triton", compile=compiled, attention_splits=3 if compiled else 1)
    _same(ref, generate_fast(stage, prompts, params, options=opts))


def test_attention_launch_options_are_checked():
    with pytest.raises(ValueError, match="attention_splits=17: use 1 to 16"):
        FastOptions(attention_splits=17)
    with pytest.raises(ValueError, match="attention block_n=48: use 16, 32, 64, 128 or 256"):
        FastOptions(attention_block=48)


def test_blas_preference_is_scoped_to_cuda_calls(monkeypatch):
    from meshrl.engine.generation.fast import preferred_blas
    state = {"lib": "cublas"}

    def fake(name=None):
        if name is not None:
            state["lib"] = name
        return state["lib"]
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", fake)
    with preferred_blas("cublaslt", torch.device("cpu")):
        assert state["lib"] == "cublas"  # CPU matmuls: nothing to choose
    with pytest.raises(KeyError), preferred_blas("cublaslt", "cuda"):
        assert state["lib"] == "cublaslt"
        raise KeyError("a failing generate call")
    assert state["lib"] == "cublas"  # restored, even after an error
    with preferred_blas(None, "cuda"):
        assert state["lib"] == "cublas"
    with pytest.raises(ValueError, match="blas='mkl': use one of"):
        FastOptions(blas="mkl")


def test_engine_with_triton_attention_interpreted():
    run_interpreted(__file__, "interpreted_", 3)
