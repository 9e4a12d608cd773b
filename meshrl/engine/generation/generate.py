"""The entry points: ``generate`` (one call) and ``generator`` (many calls of one stage), each on
the engine ``choose_engine`` picks. Both engines take the same arguments and give the same outputs
(tokens equal, log-probs to fp32 rounding) for the same seed; see ``sequences.py`` for their order.
"""
from __future__ import annotations

import contextlib
import os

from .fast import FastGenerator, FastOptions
from .lockstep import agree_max, coupled, stand_in
from .outputs import GenerationResult
from .reference import generate_reference
from .sampling import SamplingParams
from .sequences import Sequences

ENGINES = ("auto", "fast", "reference")


def choose_engine(stage, engine: str | None = None) -> str:
    """``engine`` or ``MESHRL_GENERATE`` (read per call), default auto: the fast engine where the
    stage's parameters are CUDA tensors (its graphs and kernels are CUDA's) and the stage runs
    without sequence parallelism, the reference elsewhere."""
    choice = (engine or os.environ.get("MESHRL_GENERATE", "") or "auto").strip().lower()
    if choice not in ENGINES:
        raise ValueError(f"generation engine {choice!r}: use one of {ENGINES}")
    if choice == "auto":
        fast = next(stage.parameters()).is_cuda and not stage.sequence_parallel
        return "fast" if fast else "reference"
    return choice


def generate(stage, prompts: list[list[int]], params: SamplingParams, *, seq_offset: int = 0,
             device=None, engine: str | None = None, samples: int = 1, slots: int | None = None,
             limits=None) -> GenerationResult:
    """``samples`` continuations of each prompt (prompt-major); every rank of the model replica
    calls this with the same prompts. ``seq_offset`` is the global index of the first sequence
    (data-parallel replicas pass their offset), which keys the sampling noise so the tokens depend
    on no layout. ``slots``: sequences decoded at once (default: all); ``limits``: per sequence,
    new tokens at most."""
    with generator(stage, engine) as gen:
        return gen(prompts, params, seq_offset=seq_offset, device=device, samples=samples,
                   slots=slots, limits=limits)


@contextlib.contextmanager
def generator(stage, engine: str | None = None, options: FastOptions | None = None):
    """``generate`` for many calls on one stage, as ``gen(prompts, params, *, seq_offset=,
    device=, samples=, slots=, limits=, on_progress=)`` (``on_progress()`` is called between
    decode chunks or batches, e.g. to tell a watchdog the call is alive). The fast engine keeps its
    session (static cache, captured graphs) from call to call, so a rollout captures once, and frees
    it on leaving the block, before training needs the memory."""
    if choose_engine(stage, engine) == "fast":
        # one session at a time: a smaller last call replaces the full calls' cache rather than
        # holding a second one beside it
        fast = FastGenerator(stage, options or FastOptions(max_sessions=1))
        try:
            yield fast.generate
        finally:
            fast.release()
    else:
        yield lambda prompts, params, **kw: generate_static_reference(stage, prompts, params, **kw)


def generate_static_reference(stage, prompts, params: SamplingParams, *, seq_offset: int = 0,
                              device=None, samples: int = 1, slots: int | None = None, limits=None,
                              on_progress=None) -> GenerationResult:
    """The reference engine over static batches of ``slots`` consecutive sequences (each batch runs
    until its last sequence finishes; every sample prefills its own prompt)."""
    if not prompts and coupled(stage.layout):  # under ep every replica steps
        return stand_in(lambda p, pr, **kw: generate_static_reference(stage, p, pr, **kw), params,
                        device=device, on_progress=on_progress)
    seqs = Sequences.build(prompts, params.max_new_tokens, samples=samples, limits=limits,
                           seq_offset=seq_offset)
    size = seqs.slot_count(slots)
    batches = -(-len(seqs) // size)
    # under ep every replica of a group runs as many batches as the one with the most; the extra
    # ones generate a one-token placeholder (output dropped)
    device = device if device is not None else stage.inv_freq.device
    batches = agree_max([batches], stage.layout, device)[0]
    parts = []
    for b in range(batches):
        lo, hi = b * size, min(len(seqs), (b + 1) * size)
        if lo >= len(seqs):
            generate_reference(stage, [[0]], params, device=device, limits=[1])
            continue
        parts.append(generate_reference(stage, seqs.flat_prompts(lo, hi), params,
                                        seq_offset=seq_offset + lo, device=device,
                                        limits=seqs.limits[lo:hi]))
        if on_progress is not None:
            on_progress()
    return GenerationResult.concat(parts)
