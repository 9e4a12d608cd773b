"""The fast generation engine: the same outputs as ``generate.generate`` for the same seed, with a
static KV cache, a decode step whose shapes never change (so it is captured once as a CUDA graph on
GPU and replayed), device-side bookkeeping with a termination check every ``check_every`` steps,
microbatches pipelined across pp stages, and sampling on vocabulary shards.

A ``FastGenerator`` keeps its session (cache, buffers, captured graphs) between calls of the same
batch size and sampling settings, so a caller that generates batch after batch (the CLI, a rollout
loop) captures once; ``release()`` frees it all, e.g. before training needs the memory.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..generate import GenerationResult, stage_pass
from ..model.attention import PackedMeta
from ..sampling import SamplingParams
from .attention import BLOCK_N as ATTN_BLOCK_N
from .attention import MAX_SPLITS, check_launch
from .attention import NUM_WARPS as ATTN_NUM_WARPS
from .sampling import Sampler, record_step, shard_sample
from .schedule import Schedule
from .session import Session
from .step import DecodeWeights, StepFns, decode_layers, pre_attention, prefill_layers

COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")
# Failures that say nothing about compilation or capture: re-raised, never answered by falling
# back to eager pieces (which would hide them, or desynchronise ranks whose collectives went on).
NOT_A_COMPILE_FAILURE = (torch.OutOfMemoryError, dist.DistError)
CAPACITY_QUANTUM = 64  # cache capacity is rounded up, so batches of similar length share a session


@dataclass(kw_only=True)
class FastOptions:
    check_every: int = 16  # decode steps between host reads of the done flags
    cuda_graphs: bool | None = None  # None: on CUDA devices at tp=1
    compile: bool | None = None  # torch.compile the per-layer pieces; None: on CUDA devices
    # torch.compile's mode for those pieces: None (default) or "max-autotune-no-cudagraphs" (inductor
    # times Triton GEMM templates against cuBLAS for the decode shapes; minutes of compilation)
    compile_mode: str | None = None
    attention: str = "auto"  # auto (Triton on CUDA, see kernels.dispatch) | triton | torch
    # Triton decode attention: programs per (sequence, KV head); None chooses from the shapes and
    # the GPU's SM count (1 unless batch × KV heads leaves SMs idle)
    attention_splits: int | None = None
    # Triton decode attention: cached positions per loop step and warps per program
    attention_block: int = ATTN_BLOCK_N
    attention_warps: int = ATTN_NUM_WARPS
    fuse_mlp: bool = True  # one gate+up matmul; costs a copy of those weights while held
    prefill_pieces: bool = True  # prefill through the decode pieces; False: the stage's own forward
    max_sessions: int = 2
    # cuBLAS front end for the matmuls while generating on CUDA (set for each call and restored;
    # the captured step keeps the kernels chosen at capture). At batch 64 the decode matmuls are
    # bandwidth-bound and cuBLASLt picked faster kernels for two of the five 1.1B shapes (~8%
    # each); the whole call ran 2.2% faster on an H100. None leaves torch's setting.
    blas: str | None = "cublaslt"

    def __post_init__(self):
        if self.check_every < 1:
            raise ValueError(f"check_every={self.check_every}: must be at least 1")
        if self.attention not in ("auto", "triton", "torch"):
            raise ValueError(f"attention={self.attention!r}: use auto, triton or torch")
        if self.attention_splits is not None and not 1 <= self.attention_splits <= MAX_SPLITS:
            raise ValueError(f"attention_splits={self.attention_splits}: use 1 to {MAX_SPLITS}, "
                             "or None to choose from the GPU")
        check_launch(self.attention_block, self.attention_warps)
        if self.blas not in BLAS_LIBRARIES:
            raise ValueError(f"blas={self.blas!r}: use one of {BLAS_LIBRARIES}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={self.compile_mode!r}: use one of {COMPILE_MODES} (the "
                             "step is captured by this engine, so modes with cudagraphs are refused)")


BLAS_LIBRARIES = (None, "cublas", "cublaslt")


@contextlib.contextmanager
def preferred_blas(name: str | None, device):
    """torch's preferred cuBLAS front end set to ``name`` for the block on a CUDA ``device``
    (elsewhere, or with None, nothing changes); the previous choice is restored after."""
    if name is None or torch.device(device).type != "cuda":
        yield
        return
    prefs = torch.backends.cuda
    before = prefs.preferred_blas_library()
    try:
        prefs.preferred_blas_library(name)
    except RuntimeError as err:  # a build without that front end: generation runs as it is
        warnings.warn(f"FastOptions(blas={name!r}) not applied: {err}", stacklevel=3)
        yield
        return
    try:
        yield
    finally:
        prefs.preferred_blas_library(before)


def _capture_mode() -> str:
    """CUDA graph capture's checks: of every thread (the default) when capturing on the main
    thread; of this thread only when generating in the background (async RL), where the main thread
    keeps gathering meanwhile and its calls are not this capture's."""
    return "global" if threading.current_thread() is threading.main_thread() else "thread_local"


class FastGenerator:
    """Generation for one stage of a model replica; every rank of the replica calls ``generate``
    with the same prompts, as for ``generate.generate``."""

    def __init__(self, stage, options: FastOptions | None = None):
        if stage.head != "lm":
            raise ValueError("generate needs a model with an LM head")
        if stage.sequence_parallel:
            raise ValueError("fast generation runs without sequence parallelism: build the "
                             "generation stage with sequence_parallel=False")
        self.stage, self.opts = stage, options or FastOptions()
        on_cuda = next(stage.parameters()).is_cuda
        # Under tp a captured step holds NCCL all-reduces; that works in Megatron's graphs but has
        # not been run on this project's GPUs yet, so it is opt-in (cuda_graphs=True) for now.
        auto = on_cuda and stage.layout.tp_size == 1
        self.graphs = auto if self.opts.cuda_graphs is None else self.opts.cuda_graphs
        if self.graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the stage on a CUDA device")
        self.compiled = on_cuda if self.opts.compile is None else self.opts.compile
        self.fns = StepFns.compiled(self.opts.compile_mode) if self.compiled else StepFns()
        self.prefill_fns = (StepFns.compiled(self.opts.compile_mode, prefill=True) if self.compiled
                            else StepFns())
        self.compile_failed = None  # the exception, when compiling fell back to eager pieces
        self.capture_failed = None  # the exception, when capturing fell back to eager steps
        self.weights = DecodeWeights(stage, fuse_mlp=self.opts.fuse_mlp)
        self.attention_launch = dict(splits=self.opts.attention_splits,
                                     block_n=self.opts.attention_block,
                                     num_warps=self.opts.attention_warps)
        self._sessions: OrderedDict = OrderedDict()
        self._fingerprint = None

    def release(self):
        """Free the cache, buffers, graphs and fused weights (compiled code stays cached by torch)."""
        self._sessions.clear()
        self.weights.release()
        self._fingerprint = None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, *, seq_offset: int = 0,
                 device=None) -> GenerationResult:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        device = device if device is not None else self.stage.inv_freq.device
        with preferred_blas(self.opts.blas, device):
            return self._generate(prompts, params, seq_offset, device)

    def _generate(self, prompts, params, seq_offset, device) -> GenerationResult:
        self.weights.refresh()
        fingerprint = self.weights.fingerprint()
        if fingerprint != self._fingerprint:  # parameters moved: graphs point at old storage
            for sess in self._sessions.values():
                sess.graphs, sess.prepared = None, False
            self._fingerprint = fingerprint
        sess = self._session(prompts, params, device)
        sess.reset(prompts, params, seq_offset)
        self._prefill(sess, prompts)
        sched = Schedule(self.stage.layout.pp_size, len(sess.rows), params.max_new_tokens - 1)
        if sched.steps and not sess.prepared:
            self._prepare(sess)
        self._decode(sess, sched)
        return sess.result()

    # ---- sessions -------------------------------------------------------------------------------
    def _session(self, prompts, params, device) -> Session:
        capacity = max(len(p) for p in prompts) + params.max_new_tokens
        capacity = -(-capacity // CAPACITY_QUANTUM) * CAPACITY_QUANTUM
        key = (len(prompts), params.greedy, params.temperature, params.top_k, params.top_p,
               params.min_new_tokens, tuple(params.eos_ids), tuple(params.stop_ids),
               params.max_new_tokens, str(device))
        sess = self._sessions.pop(key, None)
        if sess is not None and sess.capacity < capacity:
            sess = None
        if sess is None:
            while len(self._sessions) >= self.opts.max_sessions:
                self._sessions.popitem(last=False)
            sess = Session(self.stage, len(prompts), capacity, params, device,
                           self._sampler(params, device))
        self._sessions[key] = sess
        return sess

    def _sampler(self, params, device):
        stage = self.stage
        if not stage.layout.is_last_stage:
            return None
        head = stage.lm_head
        start = stage.layout.tp_rank * head.weight.shape[0]
        fn = None
        if self.compiled and stage.layout.tp_size == 1:  # under tp its collectives stay eager
            fn = torch.compile(shard_sample, dynamic=False, fullgraph=True,
                               mode=self.opts.compile_mode)
        return Sampler(params, stage.cfg.vocab_size, start, head.weight.shape[0],
                       stage.layout.tp_group, device, fn=fn)

    # ---- prefill --------------------------------------------------------------------------------
    def _prefill(self, sess: Session, prompts):
        """All prompts packed through the decode step's pieces (fused weights; compiled for any
        row count on GPU), their attention filling the static cache, then step 0 sampled eagerly
        from each prompt's last position."""
        stage, layout = self.stage, self.stage.layout
        lengths = [len(p) for p in prompts]
        meta = PackedMeta.from_lengths(lengths, device=sess.device)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=sess.device)
        h = stage_pass(stage, ids, meta, sess.cache, (ids.numel(), stage.cfg.hidden_size),
                       forward=self._prefill_forward if self.opts.prefill_pieces else None)
        if layout.is_last_stage:
            last = (meta.cu_seqlens[1:] - 1).long()
            zero = torch.zeros((), dtype=torch.long, device=sess.device)
            logits = F.linear(h[last], stage.lm_head.weight)
            tok, logp = sess.sampler(logits, sess.keys, zero, eager=True)
            record_step(sess.state, tok, logp, zero)
        if layout.pp_size > 1:
            dist.broadcast(sess.state.tokens, src=layout.stage_rank(layout.pp_size - 1),
                           group=layout.pp_group)
        sess.steps.fill_(1)

    def _prefill_forward(self, ids, meta, cache):
        x = self.stage.input_hidden(ids)
        try:
            return prefill_layers(self.stage, self.weights, self.prefill_fns, x, meta, cache)
        except Exception as exc:  # noqa: BLE001 - reported through compile_failed and a warning
            if (self.opts.compile or self.prefill_fns.pre is pre_attention
                    or isinstance(exc, NOT_A_COMPILE_FAILURE)):
                raise
            warnings.warn(f"fast generation: torch.compile failed in the prefill ({exc!r:.300}); "
                          "running it uncompiled")
            self.compile_failed, self.prefill_fns = exc, StepFns()
            return prefill_layers(self.stage, self.weights, self.prefill_fns, x, meta, cache)

    # ---- one decode item --------------------------------------------------------------------------
    def _step(self, sess: Session, m: int):
        """Microbatch m one step through this stage; every tensor it touches is a session buffer,
        so the same call can be captured and replayed. Returns the hidden states to send on."""
        stage, layout = self.stage, self.stage.layout
        rows = sess.rows[m]
        pos = sess.lengths[rows]
        x = stage.model.embed_tokens(sess.state.tokens[rows]) if layout.is_first_stage \
            else sess.hidden_in[m]
        h = decode_layers(stage, self.weights, self.fns, x, pos, sess.cache_rows[m],
                          attention=None if self.opts.attention == "auto" else self.opts.attention,
                          launch=self.attention_launch)
        pos += 1
        if not layout.is_last_stage:
            return h
        step = sess.steps[m]
        tok, logp = sess.sampler(F.linear(h, stage.lm_head.weight), sess.keys[rows], step)
        self.fns.record(sess.views[m], tok, logp, step)
        return None

    def _prepare(self, sess: Session):
        """A session's first decode: run the step on a copy of the state (compiling the pieces;
        an inductor failure falls back to the eager pieces unless ``compile=True`` was asked for),
        restore the state, and capture one graph per microbatch into a shared memory pool."""
        if not (self.graphs or self.compiled):
            sess.prepared = True
            return
        saved = sess.snapshot()
        side = torch.cuda.Stream() if self.graphs else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            try:
                self._warm_up(sess)
            except Exception as exc:  # noqa: BLE001 - reported through compile_failed and a warning
                if self.opts.compile or not self.compiled or isinstance(exc, NOT_A_COMPILE_FAILURE):
                    raise
                warnings.warn(f"fast generation: torch.compile failed ({exc!r:.300}); "
                              "running the decode step uncompiled")
                self.compile_failed, self.compiled, self.fns = exc, False, StepFns()
                if sess.sampler is not None:
                    sess.sampler.fn = shard_sample
                sess.restore(saved)
                self._warm_up(sess)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        sess.restore(saved)
        if self.graphs:
            try:
                sess.graphs = self._capture(sess)
            except Exception as exc:  # noqa: BLE001 - reported through capture_failed and a warning
                if self.opts.cuda_graphs or isinstance(exc, NOT_A_COMPILE_FAILURE):
                    raise
                warnings.warn(f"fast generation: CUDA graph capture failed ({exc!r:.300}); "
                              "replaying the decode step eagerly")
                torch.cuda.synchronize()
                self.capture_failed, self.graphs = exc, False
        sess.prepared = True

    def _capture(self, sess):
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        for m in range(len(sess.rows)):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, capture_error_mode=_capture_mode()):
                out = self._step(sess, m)
            graphs.append((g, out))
        return graphs

    def _warm_up(self, sess):
        for _ in range(2 if self.graphs else 1):
            for m in range(len(sess.rows)):
                self._step(sess, m)

    # ---- the decode loop --------------------------------------------------------------------------
    def _decode(self, sess: Session, sched: Schedule):
        layout = self.stage.layout
        stage_idx = layout.pp_rank
        checks = sched.check_ticks(self.opts.check_every)
        for tick in range(sched.ticks):
            item = sched.item(tick, stage_idx)
            if item is not None:
                if sess.graphs is not None:
                    g, out = sess.graphs[item.m]
                    g.replay()
                else:
                    out = self._step(sess, item.m)
                sess.hidden_out[item.m] = out
            if tick in checks and self._all_done(sess):
                return
            if layout.pp_size > 1:
                self._exchange(sess, sched.transfers(tick, stage_idx))

    def _all_done(self, sess) -> bool:
        """The one host read per ``check_every`` steps; under pp the last stage decides for all."""
        layout = self.stage.layout
        flag = sess.state.done.all().to(torch.int32).reshape(1)
        if layout.pp_size > 1:
            dist.broadcast(flag, src=layout.stage_rank(layout.pp_size - 1), group=layout.pp_group)
        return bool(flag.item())

    def _exchange(self, sess, transfers):
        layout = self.stage.layout
        ops = []
        for kind, direction, m in transfers:
            if kind == "hidden":
                peer = layout.stage_rank(layout.pp_rank + (1 if direction == "send" else -1))
                buf = sess.hidden_out[m] if direction == "send" else sess.hidden_in[m]
            else:
                peer = layout.stage_rank(0 if direction == "send" else layout.pp_size - 1)
                buf = sess.state.tokens[sess.rows[m]]
            op = dist.isend if direction == "send" else dist.irecv
            ops.append(dist.P2POp(op, buf, peer, layout.pp_group))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()


def generate_fast(stage, prompts: list[list[int]], params: SamplingParams, *, seq_offset: int = 0,
                  device=None, options: FastOptions | None = None) -> GenerationResult:
    """``generate.generate`` through a one-off ``FastGenerator`` (a caller generating many batches
    should keep one generator instead, so its graphs are captured once)."""
    gen = FastGenerator(stage, options)
    try:
        return gen.generate(prompts, params, seq_offset=seq_offset, device=device)
    finally:
        gen.release()


__all__ = ["FastGenerator", "FastOptions", "generate_fast"]
