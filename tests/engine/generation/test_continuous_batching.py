"""Continuous batching and shared prefixes in the fast engine: every sequence's tokens and log-probs
are the reference engine's whatever the slot count, admission order, refill policy or layout.

The reference runs every sequence in one lock-step batch (prompt repeated per sample, each keyed
by its global index); the fast engine runs them through fewer slots, refilled as sequences finish,
samples copying their prompt's prefix. Lengths from 1 to the cap come from per-sequence limits and
from stop tokens."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from meshrl.engine.generation import (
    FastOptions,
    SamplingParams,
    generate,
    generate_fast,
)
from meshrl.engine.generation.sequences import Sequences
from meshrl.engine.generation.slots import SlotTable
from meshrl.engine.model import build_stage
from meshrl.parallel.layout import ParallelLayout
from meshrl.testing.tiny_models import make_tiny_hf

PROMPTS = [[3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14], [1], [20, 21], [30, 31, 32, 33, 34],
           [40, 41, 42, 43]]
CAP = 12
SAMPLED = SamplingParams(max_new_tokens=CAP, temperature=1.1, top_k=40, top_p=0.95, eos_ids=[2],
                         stop_ids=[6], seed=5)
GREEDY = SamplingParams(max_new_tokens=CAP, greedy=True, eos_ids=[2])


def limits_for(n: int) -> list[int]:
    """Per-sequence caps covering 1..CAP (long-tailed: mostly short, some at the cap)."""
    g = torch.Generator().manual_seed(n)
    draw = torch.clamp(torch.exp(torch.randn(n, generator=g) * 0.9 + 1.2).round(), 1, CAP)
    out = [int(x) for x in draw]
    out[0], out[-3:] = 1, [CAP] * 3
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_hf("llama", str(tmp_path_factory.mktemp("cb") / "llama"), seed=2)


def _same(ref, got, where=""):
    assert got.output_ids == ref.output_ids, f"tokens differ {where}"
    assert got.finish_reason == ref.finish_reason, f"finish reasons differ {where}"
    for a, b in zip(ref.logprobs, got.logprobs):
        # the tolerance of tests/engine/generation/test_fast.py (fp32, summation order only)
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=3e-5, rtol=0), where


def _reference(stage, params, k, limits, offset=3):
    return generate(stage, PROMPTS, params, seq_offset=offset, engine="reference", samples=k,
                    limits=limits)


# ---- the slot table ---------------------------------------------------------------------------
def test_admission_fills_free_slots_in_order_and_shares_prefixes():
    seqs = Sequences.build([[1, 2], [3], [4, 5, 6]], 8, samples=2)
    t = SlotTable(3, seqs)
    a = t.admit()
    assert a.slots == [(0, 0), (1, 1), (2, 2)]
    assert a.prefill == [(0, 0), (2, 1)] and a.copies == [(0, 1, 0)]  # prompt 0 once, copied
    assert a.completed == [0]  # prompt 1's second sample still waits
    assert not t.admit()  # no free slot
    assert t.finish([False, True, False]) == [(1, 1)]
    a = t.admit()  # sequence 3 (prompt 1) copies from slot 2, which still runs prompt 1
    assert a.slots == [(1, 3)] and a.prefill == [] and a.copies == [(2, 1, 1)]
    t.finish([True, True, True])
    a = t.admit()  # prompt 2: no slot holds it; its two samples, one prefill and one copy
    assert a.slots == [(0, 4), (1, 5)] and a.prefill == [(0, 2)] and a.copies == [(0, 1, 2)]
    t.finish([True, True, False])
    assert t.all_finished and not t.admit()


def test_a_free_slot_keeps_its_prefix_until_given_another_prompt():
    seqs = Sequences.build([[1], [2]], 4, samples=3)
    t = SlotTable(2, seqs)
    t.admit()  # seqs 0, 1 (prompt 0)
    t.finish([True, False])
    a = t.admit()  # seq 2 (prompt 0) into slot 0, whose cache still holds prompt 0
    assert a.slots == [(0, 2)] and a.prefill == [] and a.copies == []


def test_static_batches_wait_for_every_slot():
    t = SlotTable(2, Sequences.build([[1], [2], [3]], 4), refill=False)
    t.admit()
    t.finish([True, False])
    assert not t.admit()
    t.finish([False, True])
    assert t.admit().slots == [(0, 2)]


def test_without_sharing_every_sample_prefills():
    t = SlotTable(4, Sequences.build([[1, 2]], 4, samples=3), share_prefixes=False)
    a = t.admit()
    assert a.prefill == [(0, 0), (1, 0), (2, 0)] and a.copies == []


def test_bad_limits_and_samples_are_one_line():
    with pytest.raises(ValueError, match="limits must lie in"):
        Sequences.build([[1]], 4, limits=[5])
    with pytest.raises(ValueError, match="limits has 1 entries for 2 sequences"):
        Sequences.build([[1]], 4, samples=2, limits=[1])
    with pytest.raises(ValueError, match="samples=0"):
        Sequences.build([[1]], 4, samples=0)


def test_both_engines_refuse_zero_slots_in_one_line(model):
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=model)
    for engine in ("fast", "reference"):
        with pytest.raises(ValueError, match=r"^generate: slots=0: must be at least 1$"):
            generate(stage, PROMPTS, GREEDY, engine=engine, slots=0)


# ---- the engine against the reference ---------------------------------------------------------
@pytest.mark.parametrize("params", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
def test_fewer_slots_than_sequences_match_the_reference(model, params):
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=model)
    k = 3
    limits = limits_for(len(PROMPTS) * k)
    ref = _reference(stage, params, k, limits)
    lengths = sorted({len(t) for t in ref.output_ids})
    assert lengths[0] == 1 and lengths[-1] == CAP and len(lengths) >= 5, lengths
    for slots, every, opts in [(1, 1, {}), (4, 3, {}), (7, 2, {}), (18, 5, {}),
                               (5, 4, dict(refill=False)), (4, 3, dict(share_prefixes=False))]:
        got = generate_fast(stage, PROMPTS, params, seq_offset=3, samples=k, slots=slots,
                            limits=limits, options=FastOptions(check_every=every, **opts))
        _same(ref, got, f"slots={slots} every={every} {opts}")


def test_a_prompt_is_prefilled_once_for_all_its_samples(model):
    from meshrl.engine.generation import FastGenerator
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=model)
    k = 4
    once = sum(len(p) for p in PROMPTS)
    gen = FastGenerator(stage, FastOptions(check_every=2))
    gen.generate(PROMPTS, SAMPLED, samples=k, slots=24)  # every sample admitted with its siblings
    assert gen.last_stats["prefill_tokens"] == once and gen.last_stats["slots"] == 24
    # 3 slots: each prompt's first sample runs long and its others stop at once, so samples admitted
    # later copy the prefix from the slot still running their prompt: still one prefill each
    limits = [CAP if i % k == 0 else 1 for i in range(len(PROMPTS) * k)]
    got = gen.generate(PROMPTS, GREEDY, samples=k, slots=3, limits=limits)
    assert gen.last_stats["prefill_tokens"] == once, gen.last_stats
    _same(_reference(stage, GREEDY, k, limits, offset=0), got, "3 slots")
    gen = FastGenerator(stage, FastOptions(share_prefixes=False))
    gen.generate(PROMPTS, SAMPLED, samples=k, slots=24)
    assert gen.last_stats["prefill_tokens"] == k * once


def test_refilling_keeps_slots_busier_than_static_batches(model):
    from meshrl.engine.generation import FastGenerator
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=model)
    limits = limits_for(len(PROMPTS) * 4)
    steps = {}
    for refill in (True, False):
        gen = FastGenerator(stage, FastOptions(check_every=1, refill=refill))
        gen.generate(PROMPTS, GREEDY, samples=4, slots=6, limits=limits)
        steps[refill] = gen.last_stats["decode_steps"]
    assert steps[True] < steps[False], steps


def test_sequences_ending_at_their_first_token_spend_no_decode_steps(model):
    from meshrl.engine.generation import FastGenerator
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=model)
    # every token is a stop token: each sequence ends at its first, sampled from the prefill
    params = SamplingParams(max_new_tokens=CAP, greedy=True, stop_ids=list(range(stage.cfg.vocab_size)))
    gen = FastGenerator(stage, FastOptions(check_every=16))
    got = gen.generate(PROMPTS, params, samples=2, slots=4)
    assert all(len(t) == 1 for t in got.output_ids) and set(got.finish_reason) == {"stop"}
    assert gen.last_stats["decode_steps"] == 0 and gen.last_stats["admissions"] == 3


def test_warm_up_after_admissions_restores_the_state(model, monkeypatch):
    # On GPU the first decode chunk compiles and captures the step after warming it up on the live
    # state, then restores that state (Session.snapshot/restore). Here that path runs with eager
    # pieces, after two admissions whose sequences all end at their first token, so the state it
    # saves already holds earlier sequences' rows.
    from meshrl.engine.generation import FastGenerator
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=model)
    k = 2
    limits = [1] * 8 + limits_for(len(PROMPTS) * k)[8:]
    gen = FastGenerator(stage, FastOptions(check_every=2))
    gen.compiled = True  # take the warm-up path of a compiled engine (with eager pieces)
    seen, real = [], FastGenerator._prepare

    def prepare(self, sess):
        before = [t.clone() for t in (*vars(sess.state).values(), sess.lengths, sess.keys)]
        real(self, sess)
        after = (*vars(sess.state).values(), sess.lengths, sess.keys)
        seen.append((self.last_admissions, all(torch.equal(x, y) for x, y in zip(before, after))))
    monkeypatch.setattr(FastGenerator, "_prepare", prepare)
    real_admit = FastGenerator._admit

    def counting(self, *a):
        self.last_admissions = getattr(self, "last_admissions", 0) + 1
        return real_admit(self, *a)
    monkeypatch.setattr(FastGenerator, "_admit", counting)
    got = gen.generate(PROMPTS, SAMPLED, samples=k, slots=4, limits=limits)
    assert seen == [(3, True)], seen  # once, after the third admission, leaving the state as it was
    _same(_reference(stage, SAMPLED, k, limits, offset=0), got, "warm-up mid-call")


def test_free_slots_step_at_the_end_of_the_prefix_they_hold(model):
    # a free slot keeps stepping with the others; parked at its held prompt's end, it attends over
    # that prompt alone instead of a position that grew to the cache's end
    from meshrl.engine.generation import FastGenerator
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=model)
    gen = FastGenerator(stage, FastOptions(check_every=2))
    gen.generate(PROMPTS, GREEDY, samples=2, slots=5, limits=limits_for(len(PROMPTS) * 2))
    (sess,) = gen._sessions.values()  # every slot is free once the call returns
    assert set(sess.lengths.tolist()) <= {len(p) for p in PROMPTS}, sess.lengths


def _distributed(path, tp, pp, cases):
    import torch.distributed as dist
    layout = ParallelLayout(ranks=list(range(dist.get_world_size())), tp=tp, pp=pp, dp=1)
    stage = build_stage(layout, model_dir=path)
    return [generate_fast(stage, PROMPTS, params, seq_offset=3, samples=k, slots=slots,
                          limits=limits, options=FastOptions(check_every=every))
            for params, k, slots, limits, every in cases]


@pytest.mark.parametrize("world,tp,pp", [(2, 2, 1), (2, 1, 2)])
def test_continuous_batching_under_tp_and_pp(dist_pool, model, world, tp, pp):
    single = build_stage(ParallelLayout(ranks=[0]), model_dir=model)
    n = len(PROMPTS)
    # pp: 5 slots in 2 ragged microbatches; 1 slot (fewer microbatches than stages)
    cases = [(SAMPLED, 3, 5, limits_for(3 * n), 2), (GREEDY, 2, 1, limits_for(2 * n), 3),
             (SAMPLED, 4, 9, None, 4)]
    results = dist_pool(world).run(_distributed, model, tp, pp, cases)
    for i, (params, k, _, limits, _) in enumerate(cases):
        ref = _reference(single, params, k, limits)
        for rank, res in enumerate(results):  # every rank returns the same result
            _same(ref, res[i], f"rank {rank} case {i} tp={tp} pp={pp}")


# ---- meshrl generate ---------------------------------------------------------------------------
def test_cli_samples_per_prompt(model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": p, "id": i}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    rows = {}
    for engine in ("fast", "reference"):
        out = tmp_path / f"{engine}.jsonl"
        subprocess.run([sys.executable, "-m", "meshrl.cli", "generate", "--model", model,
                        "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "6",
                        "--samples-per-prompt", "3", "--batch-size", "4", "--seed", "9",
                        "--temperature", "1.2", "--engine", engine], check=True,
                       capture_output=True, text=True)
        rows[engine] = [json.loads(line) for line in out.read_text().splitlines()]
    fast, ref = rows["fast"], rows["reference"]
    assert [(r["id"], r["sample"]) for r in fast] == [(i, s) for i in range(len(PROMPTS))
                                                       for s in range(3)]
    assert [r["output_ids"] for r in fast] == [r["output_ids"] for r in ref]
    assert len({tuple(r["output_ids"]) for r in fast if r["id"] == 1}) > 1  # samples differ
