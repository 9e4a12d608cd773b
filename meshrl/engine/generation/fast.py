"""The fast generation engine: the same outputs as the reference engine for the same seed, with
continuous batching over a fixed number of slots (a finished sequence's slot is refilled with a
waiting one between decode chunks, ``slots.py``), prompts shared by their samples (prefilled once,
the prefix copied between slots), a static KV cache, a decode step whose shapes never change (so it
is captured once as a CUDA graph on GPU and replayed), device-side bookkeeping read on the host
once per chunk of ``check_every`` steps, microbatches pipelined across pp stages, and sampling on
vocabulary shards.

A ``FastGenerator`` keeps its session (cache, buffers, captured graphs) between calls with the same
slot count and sampling settings, so a caller that generates call after call (the CLI, a rollout
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

from meshrl.kernels.decode_attention import BLOCK_N as ATTN_BLOCK_N
from meshrl.kernels.decode_attention import MAX_SPLITS, check_launch
from meshrl.kernels.decode_attention import NUM_WARPS as ATTN_NUM_WARPS
from meshrl.parallel.p2p import exchange_stages
from meshrl.parallel.pipeline import fill_from_last_stage

from ..model.attention import PackedMeta
from .forward import stage_pass
from .lockstep import agree_max, coupled, idle_pass, stand_in
from .outputs import GenerationResult, to_result
from .sampling import SamplingParams
from .schedule import Schedule
from .sequences import Sequences
from .session import Session
from .shard_sampling import Sampler, shard_sample
from .slots import SlotTable
from .step import DecodeWeights, StepFns, decode_layers, pre_attention, prefill_layers

COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")
# Failures that say nothing about compilation or capture: re-raised, never answered by falling
# back to eager pieces (which would hide them, or desynchronise ranks whose collectives went on).
NOT_A_COMPILE_FAILURE = (torch.OutOfMemoryError, dist.DistError)
CAPACITY_QUANTUM = 64  # cache capacity is rounded up, so batches of similar length share a session


@dataclass(kw_only=True)
class FastOptions:
    check_every: int = 16  # decode steps between host reads of the done flags (and refills)
    refill: bool = True  # refill finished slots at once; False: only when every slot finished
    share_prefixes: bool = True  # a prompt's samples prefill it once; False: each its own
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
    # a MoE model's decode step: "sparse" (each row to its k experts; host-side split sizes, so
    # never captured) or "static" (every local expert on every slot, weighted by the routing: fixed
    # shapes a graph can hold, num_experts/ep/k times the expert FLOPs). None: static exactly when
    # the step is captured (MoE models are not captured unless cuda_graphs=True)
    expert_decode: str | None = None
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
        if self.expert_decode not in (None, "sparse", "static"):
            raise ValueError(f"expert_decode={self.expert_decode!r}: use sparse, static or None")
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
        # A MoE model's captured step would run every local expert on every slot (see
        # expert_decode): opt-in too.
        auto = on_cuda and stage.layout.tp_size == 1 and not stage.cfg.is_moe
        self.graphs = auto if self.opts.cuda_graphs is None else self.opts.cuda_graphs
        if self.graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the stage on a CUDA device")
        self.static_experts = (self.graphs if self.opts.expert_decode is None
                               else self.opts.expert_decode == "static")
        if self.graphs and not self.static_experts and stage.cfg.is_moe:
            raise ValueError("cuda_graphs=True with expert_decode='sparse': a captured step needs "
                             "fixed shapes; use expert_decode='static' or no graphs")
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
        # the last call's counts: slots, decode_steps (per slot), prefill_tokens, admissions,
        # generated_tokens (the benchmark's slot utilisation and prefill figures)
        self.last_stats: dict | None = None

    def release(self):
        """Free the cache, buffers, graphs and fused weights (compiled code stays cached by torch)."""
        self._sessions.clear()
        self.weights.release()
        self._fingerprint = None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, *, seq_offset: int = 0,
                 device=None, samples: int = 1, slots: int | None = None, limits=None,
                 on_progress=None) -> GenerationResult:
        """``generation.generate``'s contract: ``samples`` continuations of each prompt, decoded
        ``slots`` at a time (default: all at once), each capped at its ``limits`` entry."""
        if not prompts and coupled(self.stage.layout):  # under ep every replica steps
            return stand_in(self.generate, params, device=device, on_progress=on_progress)
        seqs = Sequences.build(prompts, params.max_new_tokens, samples=samples, limits=limits,
                               seq_offset=seq_offset)
        n_slots = seqs.slot_count(slots)
        device = device if device is not None else self.stage.inv_freq.device
        # under ep the replicas' decode steps exchange rows: the same slot count (and cache, so
        # the same session reuse) on each
        n_slots, longest = agree_max([n_slots, max(len(p) for p in seqs.prompts)],
                                     self.stage.layout, device)
        with preferred_blas(self.opts.blas, device):
            return self._generate(seqs, params, n_slots, longest, device, on_progress)

    def _generate(self, seqs: Sequences, params, n_slots, longest, device,
                  on_progress) -> GenerationResult:
        self.weights.refresh()
        fingerprint = self.weights.fingerprint()
        # parameters moved: graphs point at old storage (under ep all replicas re-prepare if one
        # must: preparing runs steps, whose sparse layers meet the group's)
        moved = agree_max([int(fingerprint != self._fingerprint)], self.stage.layout, device)[0]
        if moved:
            for sess in self._sessions.values():
                sess.graphs, sess.prepared = None, False
            self._fingerprint = fingerprint
        sess = self._session(n_slots, longest, params, device)
        sess.reset()
        table = SlotTable(n_slots, seqs, refill=self.opts.refill,
                          share_prefixes=self.opts.share_prefixes)
        last = self.stage.layout.is_last_stage
        outputs = {}  # sequence -> its row of Session.rows_of (last stage)
        first_hidden = {}  # prompt -> final hidden state at its last position (last stage)
        stats = dict(slots=n_slots, decode_steps=0, prefill_tokens=0, admissions=0)
        layout = self.stage.layout
        while True:
            # Each round either admits (prefill, first tokens) or decodes a chunk, then reads the
            # done flags: a sequence that ends at its first token (an EOS, a limit of 1) frees its
            # slot before any chunk is spent on it. Under ep the group's replicas agree on the
            # round: all admit if one does (the others pass idle), all decode while one runs.
            adm = None if table.all_finished else table.admit()
            admit, busy = agree_max([int(bool(adm)), int(not table.all_finished)], layout, device)
            if not busy:
                break
            if admit and not adm:
                idle_pass(self.stage, device)
            elif admit:
                stats["prefill_tokens"] += self._admit(sess, seqs, params, adm, first_hidden)
                stats["admissions"] += 1
            else:
                if not sess.prepared:
                    self._prepare(sess)
                self._decode_chunk(sess, self.opts.check_every)
                stats["decode_steps"] += self.opts.check_every
            done = fill_from_last_stage(sess.state.done.int(), self.stage.layout).tolist()
            finished = table.finish(done)
            if finished and last:
                rows = sess.rows_of([s for s, _ in finished])
                outputs.update((q, rows[i]) for i, (_, q) in enumerate(finished))
            self._park(sess, seqs, table)
            if on_progress is not None:
                on_progress()
        result = self._result(outputs, len(seqs), params.max_new_tokens, device)
        stats["generated_tokens"] = sum(len(t) for t in result.output_ids)
        self.last_stats = stats
        return result

    def _result(self, outputs: dict, n: int, width: int, device) -> GenerationResult:
        """The last stage's rows in sequence order, on every stage of the pipeline (one broadcast
        of a tensor every stage can shape, one transfer to the host)."""
        layout = self.stage.layout
        packed = torch.stack([outputs[q] for q in range(n)]) if layout.is_last_stage else None
        if layout.pp_size > 1:  # the rows are host tensors (Session.rows_of)
            buf = (packed.to(device) if layout.is_last_stage
                   else torch.empty(n, 2 * width + 2, dtype=torch.float64, device=device))
            packed = fill_from_last_stage(buf, layout).cpu()
        return to_result(packed[:, :width], packed[:, width:2 * width], packed[:, 2 * width].long(),
                         packed[:, 2 * width + 1])

    def _park(self, sess: Session, seqs: Sequences, table: SlotTable):
        """A free slot keeps stepping (static shapes) but need not attend over the whole cache: its
        position goes back to the end of the prefix it holds (0 if none), which its writes never
        touch. Every stage does the same from the same table."""
        free = [s for s, q in enumerate(table.running) if q < 0]
        if free:
            held = [len(seqs.prompts[table.holds[s]]) if table.holds[s] >= 0 else 0 for s in free]
            sess.lengths[torch.tensor(free, device=sess.device)] = torch.tensor(held,
                                                                                 device=sess.device)

    # ---- sessions -------------------------------------------------------------------------------
    def _session(self, n_slots, longest_prompt, params, device) -> Session:
        capacity = longest_prompt + params.max_new_tokens
        capacity = -(-capacity // CAPACITY_QUANTUM) * CAPACITY_QUANTUM
        key = (n_slots, params.greedy, params.temperature, params.top_k, params.top_p,
               params.min_new_tokens, tuple(params.eos_ids), tuple(params.stop_ids),
               params.max_new_tokens, str(device))
        sess = self._sessions.pop(key, None)
        if sess is not None and sess.capacity < capacity:
            sess = None
        if sess is None:
            while len(self._sessions) >= self.opts.max_sessions:
                self._sessions.popitem(last=False)
            sess = Session(self.stage, n_slots, capacity, params, device,
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

    # ---- admission: prefill, shared prefixes, the first token -----------------------------------
    def _admit(self, sess: Session, seqs: Sequences, params, adm, first_hidden) -> int:
        """Start the admitted sequences in their slots: the prompts no slot holds prefilled packed
        (through the decode step's pieces; compiled for any row count on GPU) into their slots'
        cache, the other samples' prefixes copied between slots, and step 0 sampled eagerly from
        each prompt's last position. Returns the prompt tokens prefilled."""
        stage, layout = self.stage, self.stage.layout
        dev = sess.device
        idx = sess.start([s for s, _ in adm.slots], [seqs.seq_offset + q for _, q in adm.slots],
                         [len(seqs.prompt(q)) for _, q in adm.slots],
                         [seqs.limits[q] for _, q in adm.slots], params.seed)
        prefilled = [seqs.prompts[p] for _, p in adm.prefill]
        if prefilled:
            lengths = [len(p) for p in prefilled]
            meta = PackedMeta.from_lengths(lengths, device=dev)
            ids = torch.tensor([t for p in prefilled for t in p], dtype=torch.long, device=dev)
            sess.cache.prefill_rows = torch.repeat_interleave(
                torch.tensor([s for s, _ in adm.prefill]), torch.tensor(lengths)).to(dev)
            h = stage_pass(stage, ids, meta, sess.cache, (ids.numel(), stage.cfg.hidden_size),
                           forward=self._prefill_forward if self.opts.prefill_pieces else None)
            if layout.is_last_stage:
                ends = h[(meta.cu_seqlens[1:] - 1).long()]
                for i, (_, p) in enumerate(adm.prefill):
                    first_hidden[p] = ends[i]
        elif coupled(layout):  # every prompt already held by a slot: no pass of our own
            idle_pass(stage, dev)
        if adm.copies:
            src, dst, prompts = zip(*adm.copies)
            sess.cache.copy_prefix(torch.tensor(src, device=dev), torch.tensor(dst, device=dev),
                                   max(len(seqs.prompts[p]) for p in prompts))
        if layout.is_last_stage:
            h0 = torch.stack([first_hidden[seqs.prompt_index(q)] for _, q in adm.slots])
            logits = F.linear(h0, stage.lm_head.weight)
            zero = torch.zeros(len(adm.slots), dtype=torch.long, device=dev)
            tok, logp = sess.sampler(logits, sess.keys[idx], zero, eager=True)
            sess.record_first(idx, tok, logp)
        for p in adm.completed:
            first_hidden.pop(p, None)
        return sum(len(p) for p in prefilled)

    def _may_fall_back(self, exc) -> bool:
        """Whether a failure in compiled pieces may be answered by rerunning them eagerly: not a
        failure that says nothing about compilation, and not under tp or ep, where the rerun would
        issue again the all-reduces (all-to-alls) the other tp ranks (ep replicas) have already
        moved past (they may not have failed)."""
        layout = self.stage.layout
        return (not isinstance(exc, NOT_A_COMPILE_FAILURE) and layout.tp_size == 1
                and layout.ep_size == 1)

    def _prefill_forward(self, ids, meta, cache):
        x = self.stage.input_hidden(ids)
        try:
            return prefill_layers(self.stage, self.weights, self.prefill_fns, x, meta, cache)
        except Exception as exc:  # noqa: BLE001 - reported through compile_failed and a warning
            if (self.opts.compile or self.prefill_fns.pre is pre_attention
                    or not self._may_fall_back(exc)):
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
                          launch=self.attention_launch, static=self.static_experts)
        # A finished or free slot keeps stepping (static shapes); its position stops at the cache's
        # end, where nothing it writes is read before the slot is refilled.
        pos.add_(1).clamp_(max=sess.capacity - 1)
        if not layout.is_last_stage:
            return h
        view = sess.views[m]
        tok, logp = sess.sampler(F.linear(h, stage.lm_head.weight), sess.keys[rows], view.step)
        self.fns.record(view, tok, logp)
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
                if self.opts.compile or not self.compiled or not self._may_fall_back(exc):
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
    def _decode_chunk(self, sess: Session, steps: int):
        """``steps`` decode steps of every slot, pipelined across the stages and drained at the end
        (the last stage's latest tokens first reach stage 0)."""
        layout = self.stage.layout
        sched = Schedule(layout.pp_size, len(sess.rows), steps)
        if layout.pp_size > 1:
            fill_from_last_stage(sess.state.tokens, layout)
        for tick in range(sched.ticks):
            item = sched.item(tick, layout.pp_rank)
            if item is not None:
                if sess.graphs is not None:
                    g, out = sess.graphs[item.m]
                    g.replay()
                else:
                    out = self._step(sess, item.m)
                sess.hidden_out[item.m] = out
            if layout.pp_size > 1:
                self._exchange(sess, sched.transfers(tick, layout.pp_rank))

    def _exchange(self, sess, transfers):
        layout = self.stage.layout
        sends, recvs = [], []
        for kind, direction, m in transfers:
            if kind == "hidden":
                peer = layout.pp_rank + (1 if direction == "send" else -1)
                buf = sess.hidden_out[m] if direction == "send" else sess.hidden_in[m]
            else:
                peer = 0 if direction == "send" else layout.pp_size - 1
                buf = sess.state.tokens[sess.rows[m]]
            (sends if direction == "send" else recvs).append((buf, peer))
        exchange_stages(layout, sends, recvs)


def generate_fast(stage, prompts: list[list[int]], params: SamplingParams, *, seq_offset: int = 0,
                  device=None, options: FastOptions | None = None, **kw) -> GenerationResult:
    """``generation.generate`` through a one-off ``FastGenerator`` (a caller generating many
    times should keep one generator instead, so its graphs are captured once)."""
    gen = FastGenerator(stage, options)
    try:
        return gen.generate(prompts, params, seq_offset=seq_offset, device=device, **kw)
    finally:
        gen.release()


__all__ = ["FastGenerator", "FastOptions", "generate_fast"]
