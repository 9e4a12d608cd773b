"""Reallocating parameters between two layouts: the executor of a ``ReallocPlan``, and storage release
and offload for the layout a model is leaving.

A caller moving an actor from its training layout to its generation layout (every rank of the world
runs this, in the same order; ``build`` makes a stage on the meta device)::

    p = plan(train, gen, specs_for_layout(build, train), specs_for_layout(build, gen), node_of=...)
    execute(p, tensors_by_spec(train_stage), tensors_by_spec(gen_stage))  # None where not a member
    held = release_(tensors_by_spec(train_stage))      # or offload_to_cpu(...) to keep the values
    ... generate ...
    rematerialize_(held)                                # then execute the reverse plan, or reload_()

The EMA reference update is ``execute(plan(actor, ref, ...), actor_tensors, ref_tensors, blend=α)``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import global_rank_or_zero
from .realloc_plan import (Box, PlanError, ReallocPlan, Transfer, plan, slices,  # noqa: F401
                           specs_for_layout)

# Slices start on 16-byte boundaries in a packed buffer: a dtype view needs its offset aligned,
# and vectorised copies want more than the element size.
_ALIGN = 16
# A local copy gets a launch of its own from this size up. A launch costs the host ~10 µs, the time
# an H100 takes to copy ~15 MB, so smaller copies leave the device waiting on the host. On the H100
# (2026-11-27) the 1.1B shape's copies (1-22 MiB each) ran at 75%, 82%, 64% and 61% of copy
# bandwidth with own launches from 1, 16, 64 MiB and none; the 7B shape's at 93%, 93%, 88% and 68%.
# `benchmarks/realloc.py --copy-launch-sweep` times the choice.
LARGE_COPY_MB = 16.0


def tensors_by_spec(module) -> dict[str, torch.Tensor]:
    """{spec name: parameter data} of a module whose parameters carry ``shard_spec`` (a tied
    embedding's last-stage copy appears under the embedding's name)."""
    return {p.shard_spec.name: p.detach() for p in module.parameters()}


def _offsets(chunk: list[Transfer]) -> tuple[list[int], int]:
    offs, pos = [], 0
    for t in chunk:
        offs.append(pos)
        pos += -(-t.nbytes // _ALIGN) * _ALIGN
    return offs, pos


def _view(buf: torch.Tensor, off: int, t: Transfer, dtype) -> torch.Tensor:
    return buf[off:off + t.nbytes].view(dtype).view(t.shape)


def _tensor(tensors, name, me, role) -> torch.Tensor:
    try:
        return tensors[name]
    except (KeyError, TypeError):
        raise PlanError(f"rank {me} must {role} '{name}' but its {role} tensors lack it") from None


def _put(dst: torch.Tensor, value: torch.Tensor, alpha):
    """dst ← value, or dst ← α·dst + (1−α)·value in fp32 (bf16 tensors blend without rounding the
    intermediate terms)."""
    if alpha is None:
        dst.copy_(value)
        return
    d32 = dst.float()  # the view itself when already fp32
    d32.mul_(alpha).add_(value.float() * (1 - alpha))  # out of place: value may be the source
    if d32 is not dst:
        dst.copy_(d32)


def _pack(chunk, src_tensors, dtypes, me) -> torch.Tensor:
    offs, total = _offsets(chunk)
    dev = _tensor(src_tensors, chunk[0].name, me, "send").device
    buf = torch.empty(total, dtype=torch.uint8, device=dev)
    for t, off in zip(chunk, offs):
        src = _tensor(src_tensors, t.name, me, "send")
        _view(buf, off, t, dtypes[t.name]).copy_(src[slices(t.src_index)])
    return buf


def _unpack(buf, chunk, dst_tensors, dtypes, me, alpha):
    offs, _ = _offsets(chunk)
    for t, off in zip(chunk, offs):
        dst = _tensor(dst_tensors, t.name, me, "receive")
        _put(dst[slices(t.dst_index)], _view(buf, off, t, dtypes[t.name]), alpha)


def _region(t: torch.Tensor, index: Box) -> torch.Tensor:
    if all(a == 0 and b == n for (a, b), n in zip(index, t.shape)):
        return t  # whole tensor: skips the slicing, a few microseconds a call
    return t[slices(index)]


def _copy_local(transfers, src_tensors, dst_tensors, me, alpha, large: float) -> int:
    """Large copies launch as the loop meets them, so the device copies while the host works
    through the rest; smaller contiguous ones go in multi-tensor launches per dtype pair, where
    launches, not bytes, are the cost. (Launching every large copy first ran slower in one H100
    run, 72% of copy bandwidth against 82%: the device then waits while the host gathers the
    small ones.)"""
    small: dict[tuple, tuple[list, list]] = {}
    for t in transfers:
        src = _region(_tensor(src_tensors, t.name, me, "send"), t.src_index)
        dst = _region(_tensor(dst_tensors, t.name, me, "receive"), t.dst_index)
        if alpha is not None:
            _put(dst, src, alpha)
        elif t.nbytes >= large or not (dst.is_contiguous() and src.is_contiguous()):
            dst.copy_(src)  # a strided view in a multi-tensor launch would send all to the slow path
        else:
            d, s = small.setdefault((dst.dtype, src.dtype, dst.device, src.device), ([], []))
            d.append(dst)
            s.append(src)
    for d, s in small.values():
        torch._foreach_copy_(d, s)
    return sum(t.nbytes for t in transfers)


@torch.no_grad()
def execute(moves: ReallocPlan, src_tensors: dict | None, dst_tensors: dict | None, *, group=None,
            bucket_mb: float = 64.0, blend: float | None = None, rank: int | None = None,
            copy_launch_mb: float = LARGE_COPY_MB) -> dict:
    """Run the plan ``moves`` on this rank: local copies, then rounds of batched p2p, one packed
    buffer per (sender, receiver) pair per round. Collective over every rank of either layout; a
    rank outside one layout passes None for that side. Ranks are global ranks of ``group``
    (default: the world).

    ``blend=α`` makes each destination ``α·dst + (1−α)·src`` (the EMA reference update). Without
    blend, destination padding is zeroed. Source and destination tensors must not share storage.
    With NCCL, ``group`` must have run a collective before (a first p2p batch must be collective).
    Local copies of at least ``copy_launch_mb`` get a launch each; smaller ones share multi-tensor
    launches. Returns this rank's measured bytes: sent, received, copied locally, and the number of
    rounds.
    """
    me = global_rank_or_zero() if rank is None else rank
    counts = {"sent": 0, "received": 0, "local": 0, "rounds": 0}
    counts["local"] = _copy_local(moves.local_copies(me), src_tensors, dst_tensors, me, blend,
                                  copy_launch_mb * 2**20)
    for rnd in moves.schedule(max(1, int(bucket_mb * 2**20))):
        ops, incoming = [], []
        for s, d, chunk in rnd:
            if s == me:
                buf = _pack(chunk, src_tensors, moves.dtypes, me)
                ops.append(dist.P2POp(dist.isend, buf, d, group))
                counts["sent"] += sum(t.nbytes for t in chunk)
            elif d == me:
                dev = _tensor(dst_tensors, chunk[0].name, me, "receive").device
                buf = torch.empty(_offsets(chunk)[1], dtype=torch.uint8, device=dev)
                ops.append(dist.P2POp(dist.irecv, buf, s, group))
                incoming.append((buf, chunk))
        if not ops:
            continue
        counts["rounds"] += 1
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        for buf, chunk in incoming:
            _unpack(buf, chunk, dst_tensors, moves.dtypes, me, blend)
            counts["received"] += sum(t.nbytes for t in chunk)
    if blend is None:
        for d, name, box in moves.padding:
            if d == me:
                _tensor(dst_tensors, name, me, "receive")[slices(box)].zero_()
    return counts


# ---- storage of the layout being left -------------------------------------------------------------
def _unique_storages(tensors) -> list[torch.Tensor]:
    """One tensor per distinct live storage (views of one flat buffer count once)."""
    seen, out = set(), []
    for t in (tensors.values() if isinstance(tensors, dict) else tensors):
        st = t.untyped_storage()
        if st.nbytes() and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            out.append(t)
    return out


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``: how a caller measures what ``release_``
    frees (call before and after; a released storage counts 0)."""
    return sum(t.untyped_storage().nbytes() for t in _unique_storages(tensors))


class Released:
    """Storages freed by ``release_``: tensors keep their shapes; ``rematerialize_`` re-allocates."""

    def __init__(self, items: list[tuple[torch.Tensor, int]]):
        self.items = items

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.items)


def release_(tensors) -> Released:
    """Free the storage of ``tensors`` (a dict or list) in place, FSDP-style (``storage.resize_(0)``):
    parameters, and any views of the same flat buffer, stay valid objects without memory. Reading them
    before ``rematerialize_`` is an error. Anything else sharing the storage is freed with it."""
    items = []
    for t in _unique_storages(tensors):
        st = t.untyped_storage()
        items.append((t, st.nbytes()))
        st.resize_(0)
    return Released(items)


def rematerialize_(released: Released) -> None:
    """Give released tensors their memory back (contents undefined until a reallocation fills it)."""
    for t, n in released.items:
        t.untyped_storage().resize_(n)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The whole storage behind ``t`` as a flat uint8 tensor."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _sync(device: torch.device):
    if device.type != "cpu":
        torch.accelerator.synchronize()


class Offloaded:
    """Host copies of storages ``offload_to_cpu`` freed on the device; ``reload_`` restores them."""

    def __init__(self, items: list[tuple[torch.Tensor, torch.Tensor]]):
        self.items = items

    @property
    def nbytes(self) -> int:
        return sum(h.numel() for _, h in self.items)


def offload_to_cpu(tensors) -> Offloaded:
    """Copy each distinct storage to (pinned, when on an accelerator) host memory and free it on its
    device, e.g. training shards and optimizer state while the model generates in another layout."""
    items = []
    for t in _unique_storages(tensors):
        src = _as_bytes(t)
        host = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=t.device.type != "cpu")
        host.copy_(src, non_blocking=True)
        items.append((t, host))
    for t, _ in items:
        _sync(t.device)  # the copies must land before the storage goes
    for t, _ in items:
        t.untyped_storage().resize_(0)
    return Offloaded(items)


def reload_(offloaded: Offloaded) -> None:
    """Re-allocate offloaded storages on their devices and copy the host bytes back."""
    for t, host in offloaded.items:
        t.untyped_storage().resize_(host.numel())
        _as_bytes(t).copy_(host, non_blocking=True)
    for t, _ in offloaded.items:
        _sync(t.device)


reload = reload_  # the name the runtime's brief uses
