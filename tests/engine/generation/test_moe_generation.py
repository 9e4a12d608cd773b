"""Generation of mixture-of-experts models (Qwen3-MoE, Mixtral) in both engines: the fast engine,
with either decode path for its sparse layers (sparse: each row to its experts; static: every shape
fixed, each local expert on every row, weighted by the routing, what a captured step runs), equals
the reference engine; under expert parallelism the data-parallel replicas of an ep group, each with
its own prompts (other counts, other lengths), step together and give the tokens a single process
gives."""
import pytest
import torch

from meshrl.engine.generation import FastOptions, generate, generate_fast, generator
from meshrl.engine.generation.sampling import SamplingParams
from meshrl.engine.model import build_stage
from meshrl.parallel.layout import ParallelLayout
from meshrl.testing.tiny_models import make_tiny_hf

PROMPTS = [[3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14], [1], [20, 21], [30, 31, 32, 33, 34],
           [40, 41, 42, 43]]
CASES = [
    (SamplingParams(max_new_tokens=10, greedy=True, eos_ids=[2]), 4),
    (SamplingParams(max_new_tokens=12, temperature=0.8, top_k=30, eos_ids=[2], seed=7), 3),
    (SamplingParams(max_new_tokens=16, temperature=1.3, min_new_tokens=2, eos_ids=[2],
                    stop_ids=[5, 6, 7], seed=3), 64),
]
KINDS = ("qwen3_moe", "mixtral")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("moegen")
    return {kind: make_tiny_hf(kind, str(d / kind), seed=2) for kind in KINDS}


def _same(ref, got, where=""):
    assert got.output_ids == ref.output_ids, f"tokens differ {where}"
    assert got.finish_reason == ref.finish_reason, f"finish reasons differ {where}"
    for a, b in zip(ref.logprobs, got.logprobs):
        # as test_fast.py: fp32, summation orders only (the static decode path sums every local
        # expert's weighted output, zeros included, where the reference sums the k routed ones)
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=3e-5, rtol=0), where


@pytest.mark.parametrize("decode", ["sparse", "static"])
def test_fast_engine_matches_reference_single_process(models, decode):
    for kind, path in models.items():
        stage = build_stage(ParallelLayout(ranks=[0]), model_dir=path)
        for i, (params, every) in enumerate(CASES):
            ref = generate(stage, PROMPTS, params, seq_offset=11, engine="reference")
            got = generate_fast(stage, PROMPTS, params, seq_offset=11,
                                options=FastOptions(check_every=every, expert_decode=decode))
            _same(ref, got, f"{kind} case {i}")
            with generator(stage, "fast", FastOptions(expert_decode=decode)) as gen:
                slotted = gen(PROMPTS, params, seq_offset=11, slots=2)
            _same(ref, slotted, f"{kind} case {i}, 2 slots refilled")


def _chunks(n, parts):
    """Contiguous, uneven shares of n prompts (replica d's first sequence index, count)."""
    bounds = [round(d * n / parts) for d in range(parts + 1)]
    return [(bounds[d], bounds[d + 1] - bounds[d]) for d in range(parts)]


def _replica_generate(path, sizes, prompts, engine, slots, decode=None):
    """Replica d generates its own contiguous share of the prompts (keys = their global indices)."""
    import torch.distributed as dist
    tp, pp, dp, ep = sizes
    layout = ParallelLayout(ranks=list(range(dist.get_world_size())), tp=tp, pp=pp, dp=dp, ep=ep)
    stage = build_stage(layout, model_dir=path)
    first, count = _chunks(len(prompts), dp)[layout.dp_rank]
    out = []
    options = FastOptions(max_sessions=1, expert_decode=decode) if engine == "fast" else None
    with generator(stage, engine, options) as gen:
        for params, every in CASES:
            res = gen(prompts[first:first + count], params, seq_offset=first,
                      slots=slots if engine == "fast" else None)
            out.append((first, res))
    return layout.tp_rank == 0 and layout.is_last_stage, out


# (tp, pp, dp, ep), prompts: replicas with different counts and lengths; the last, a replica with
# no prompts at all
EP_CASES = [((1, 1, 2, 2), PROMPTS[:5]), ((2, 1, 2, 2), PROMPTS[:5]), ((1, 2, 2, 2), PROMPTS[:5]),
            ((1, 1, 4, 4), PROMPTS[:3])]


@pytest.mark.parametrize("sizes,prompts", EP_CASES,
                         ids=["ep2", "tp2-ep2", "pp2-ep2", "ep4-one-replica-empty"])
@pytest.mark.parametrize("engine", ["reference", "fast-sparse", "fast-static"])
def test_expert_parallel_generation_matches_single_process(dist_pool, models, sizes, prompts,
                                                           engine):
    world = sizes[0] * sizes[1] * sizes[2]
    name, _, decode = engine.partition("-")
    for kind in KINDS:
        path = models[kind]
        single = build_stage(ParallelLayout(ranks=[0]), model_dir=path)
        want = [generate(single, prompts, params, seq_offset=0, engine="reference")
                for params, _ in CASES]
        results = dist_pool(world).run(_replica_generate, path, sizes, prompts, name, 2,
                                       decode or None)
        seen = [set() for _ in CASES]
        for reports, out in results:
            if not reports:
                continue
            for c, (first, res) in enumerate(out):
                for j, tokens in enumerate(res.output_ids):
                    assert tokens == want[c].output_ids[first + j], (kind, sizes, engine, c, first + j)
                    assert torch.allclose(torch.tensor(res.logprobs[j]),
                                          torch.tensor(want[c].logprobs[first + j]), atol=3e-5)
                    seen[c].add(first + j)
        assert all(s == set(range(len(prompts))) for s in seen), (kind, sizes, engine)


def test_compiled_pieces_with_sparse_layers_match_reference(models):
    """The GPU compiles the step's pieces (the sparse layers' norm piece among them; the experts
    run as the module's own static path); inductor's CPU backend compiles the same graphs."""
    from meshrl.engine.generation import FastGenerator
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=models["qwen3_moe"])
    gen = FastGenerator(stage, FastOptions(compile=True, check_every=4))
    for params, _ in CASES[:2]:
        _same(generate(stage, PROMPTS, params, engine="reference"), gen.generate(PROMPTS, params))
    assert gen.compiled and gen.compile_failed is None


def _direct_entry_points(path):
    """ep=2, replica 1 given no prompts, calling the engines' own entry points (not generator())."""
    import torch.distributed as dist

    from meshrl.engine.generation import FastGenerator
    from meshrl.engine.generation.generate import generate_static_reference
    layout = ParallelLayout(ranks=list(range(dist.get_world_size())), dp=2, ep=2)
    stage = build_stage(layout, model_dir=path)
    params = CASES[1][0]
    mine = PROMPTS[:3] if layout.dp_rank == 0 else []
    fast = generate_fast(stage, mine, params, options=FastOptions(check_every=3))
    ref = generate_static_reference(stage, mine, params, slots=2)
    # a compile failure may not be answered by an eager rerun on one replica: its peers have
    # already made the rerun's all-to-alls
    falls_back = FastGenerator(stage)._may_fall_back(RuntimeError("inductor failed"))
    return layout.dp_rank, fast.output_ids, ref.output_ids, falls_back


def test_engines_entry_points_step_with_the_group_without_prompts(dist_pool, models):
    path = models["mixtral"]
    single = build_stage(ParallelLayout(ranks=[0]), model_dir=path)
    want = generate(single, PROMPTS[:3], CASES[1][0], engine="reference").output_ids
    for rank, fast, ref, falls_back in dist_pool(2).run(_direct_entry_points, path):
        assert (fast, ref) == (([], []) if rank else (want, want)), rank
        assert not falls_back
