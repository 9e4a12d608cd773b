"""The flat fp32 gradient buffer of one model shard, cut into buckets reduced (SUM) over a dp group.

Why a post-accumulate hook rather than pointing ``param.grad`` into the buffer: bf16 parameters get
bf16 ``.grad`` from autograd, and the buffer must accumulate microbatches in fp32. The hook adds the
fresh ``param.grad`` into ``param.main_grad`` (a view of the buffer) and frees ``param.grad`` at once,
so every dtype takes the same path, at most one parameter's transient grad is alive, and nothing
depends on autograd's in-place accumulation rules.

Buckets hold parameters of one dtype (the all-gather after a ZeRO-1 step writes that dtype), in
reverse registration order (the order backward produces them), each padded to a multiple of the dp
size so a reduce-scatter gives every rank an equal chunk. Buckets whose parameters the model itself
synchronises (``deferred``: duplicates across the model replica, such as tied embeddings) are never
launched from a hook, so the model's own sync of their ``main_grad`` can run after backward and
before ``finish()``.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# torch 2.13 renamed the flat collectives; the lent GPU image runs 2.11, which has only the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Each rank's chunk of a bucket starts on a 128-byte boundary, which NCCL's kernels prefer.
_CHUNK_ALIGN = 32


@dataclass
class Slot:
    """One parameter's place in the flat buffer."""

    index: int
    name: str
    param: torch.nn.Parameter
    offset: int
    numel: int
    bucket: int = -1


@dataclass
class Bucket:
    index: int
    start: int
    stop: int
    dtype: torch.dtype
    slots: list[int]
    deferred: bool
    ready: set = field(default_factory=set)
    work: object = None
    launched: bool = False

    @property
    def numel(self) -> int:
        return self.stop - self.start

    def chunk(self, rank: int, size: int) -> tuple[int, int]:
        """Flat range of this bucket that dp rank ``rank`` owns under ZeRO-1."""
        c = self.numel // size
        return self.start + rank * c, self.start + (rank + 1) * c


class GradBuffer:
    """Flat fp32 grads for ``named_params`` and their bucketed SUM reduction over ``dp_group``.

    ``shard=True`` reduce-scatters (each rank needs only its chunk, ZeRO-1), else all-reduces.
    ``overlap=True`` launches a bucket's async reduction from the hook that completes it; wrap all
    but the last microbatch's backward in ``no_sync()`` then, or a later grad would land in a bucket
    already on the wire (this raises).
    """

    def __init__(self, named_params, *, dp_group, deferred=frozenset(), bucket_numel: int,
                 shard: bool = False, overlap: bool = False, use_reduce_scatter: bool = True,
                 device=None):
        self.dp_group = dp_group
        self.dp_size = 1 if dp_group is None else dist.get_world_size(dp_group)
        self.dp_rank = 0 if dp_group is None else dist.get_rank(dp_group)
        self.shard, self.overlap = shard, overlap
        self.use_reduce_scatter = use_reduce_scatter
        self.sync_enabled = True
        named_params = list(named_params)
        self.slots: list[Slot] = []
        self.buckets: list[Bucket] = []
        order = list(reversed(named_params))
        total = 0
        for is_deferred in (False, True):
            group = [(n, p) for n, p in order if (id(p) in deferred) == is_deferred]
            total = self._plan(group, total, is_deferred, max(1, int(bucket_numel)))
        if device is None:
            device = named_params[0][1].device if named_params else torch.device("cpu")
        self.data = torch.zeros(total, dtype=torch.float32, device=device)
        self._next = 0
        self._n_eager = sum(not b.deferred for b in self.buckets)
        self._hooks = []
        for slot in self.slots:
            if getattr(slot.param, "_meshrl_grad_buffer", None) is not None:
                raise ValueError(f"parameter {slot.name} already feeds another grad buffer: call "
                                 "close() on the optimizer that owns it first")
            slot.param._meshrl_grad_buffer = self
            slot.param.main_grad = self.data[slot.offset:slot.offset + slot.numel].view(slot.param.shape)
            self._hooks.append(slot.param.register_post_accumulate_grad_hook(
                functools.partial(self._on_grad, slot.index)))

    def _plan(self, named, offset: int, deferred: bool, bucket_numel: int) -> int:
        """Append slots and buckets for ``named`` from ``offset``; return the end offset."""
        cur: list[int] = []
        start, size, dtype = offset, 0, None

        def close():
            nonlocal start, size, cur
            if not cur:
                return
            align = self.dp_size * _CHUNK_ALIGN
            stop = start + -(-size // align) * align
            self.buckets.append(Bucket(len(self.buckets), start, stop, dtype, cur, deferred))
            start, size, cur = stop, 0, []

        for name, p in named:
            if cur and (p.dtype != dtype or size + p.numel() > bucket_numel):
                close()
            dtype = p.dtype
            slot = Slot(len(self.slots), name, p, start + size, p.numel(), len(self.buckets))
            self.slots.append(slot)
            cur.append(slot.index)
            size += p.numel()
        close()
        return start

    # ---- accumulation ------------------------------------------------------------------------
    def _on_grad(self, slot_index: int, param: torch.Tensor):
        slot = self.slots[slot_index]
        bucket = self.buckets[slot.bucket]
        if bucket.launched:
            raise RuntimeError(
                f"grad of {slot.name} arrived after its bucket's reduction started: with overlap=True "
                "run all but the last microbatch's backward under no_sync(), and call zero_grad() "
                "after each step")
        param.main_grad.add_(param.grad)
        param.grad = None
        if self.overlap and self.sync_enabled and not bucket.deferred:
            bucket.ready.add(slot_index)
            self._launch_ready()

    def _launch_ready(self):
        # Strictly in bucket order, so every dp rank issues the same collectives in the same order.
        while self._next < self._n_eager:
            b = self.buckets[self._next]
            if len(b.ready) < len(b.slots):
                return
            self._launch(b)
            self._next += 1

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate without launching reductions (all but the last microbatch)."""
        prev, self.sync_enabled = self.sync_enabled, False
        try:
            yield
        finally:
            self.sync_enabled = prev

    # ---- reduction ---------------------------------------------------------------------------
    def _launch(self, b: Bucket):
        b.launched = True
        if self.dp_size == 1:
            return
        view = self.data[b.start:b.stop]
        if self.shard and self.use_reduce_scatter:
            lo, hi = b.chunk(self.dp_rank, self.dp_size)
            b.work = _reduce_scatter(self.data[lo:hi], view, op=dist.ReduceOp.SUM,
                                     group=self.dp_group, async_op=True)
        else:
            # Plain DP, or ZeRO-1 on a backend without reduce-scatter: each rank then reads its chunk.
            b.work = dist.all_reduce(view, op=dist.ReduceOp.SUM, group=self.dp_group, async_op=True)

    def reduce(self):
        """Launch every bucket not yet launched, in bucket order (deferred ones last)."""
        for b in self.buckets:
            if not b.launched:
                self._launch(b)
        self._next = self._n_eager

    def finish(self):
        """Launch what is left and wait for all; afterwards the owned ranges hold the dp SUM."""
        self.reduce()
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None

    @property
    def synced(self) -> bool:
        return all(b.launched and b.work is None for b in self.buckets)

    def zero(self):
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
            b.work, b.launched = None, False
            b.ready.clear()
        self._next = 0
        self.data.zero_()
        for slot in self.slots:
            slot.param.grad = None

    # ---- memory ------------------------------------------------------------------------------
    def release(self):
        """Free the buffer's memory; ``main_grad`` views stay valid objects until ``restore()``."""
        self.data.untyped_storage().resize_(0)

    def restore(self):
        storage = self.data.untyped_storage()
        if storage.nbytes() == 0:
            storage.resize_(self.data.numel() * self.data.element_size())
            self.data.zero_()

    def close(self):
        """Detach from the parameters (hooks, ``main_grad``) so another buffer may adopt them."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for slot in self.slots:
            if getattr(slot.param, "_meshrl_grad_buffer", None) is self:
                del slot.param._meshrl_grad_buffer
                del slot.param.main_grad
