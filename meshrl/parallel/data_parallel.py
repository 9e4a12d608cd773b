"""Data parallel training: one AdamW for plain DP and ZeRO-1, fp32 master weights, global-norm clipping.

Order of a training step, for the model that owns the parameters::

    opt.zero_grad()
    train_1f1b(..., no_sync=opt.no_sync)   # backward fills param.main_grad (fp32), param.grad is None
    model_grad_sync()                      # the model's own sums of duplicated params (tied embeddings
                                           # across pp, sequence-parallel norms across tp) on main_grad
    opt.finish_grad_sync()                 # dp SUM (optional: step() calls it)
    info = opt.step()                      # {"grad_norm", "lr", "skipped"}

Gradients are summed, never averaged, over dp: meshrl's losses are already divided by the global
token count (docs/architecture.md, "Invariants and contracts"), so the SUM is the exact gradient.

Under ZeRO-1 each dp rank owns an equal chunk of every bucket of the flat buffer; it keeps fp32 master
weights and Adam moments for that chunk only (about 1/dp of plain DP's state), updates it from the
reduce-scattered grads, and all-gathers the new values in the parameters' dtype.

Expert parameters (``param.expert_parallel = True``) under a layout with ep > 1 form a second part
with its own buffer: an expert is held by the dp/ep ranks of one edp group, so its gradient is summed
there, ZeRO-1 shards its state there, and its copies are counted over one copy of every expert
(``layout.expert_mp_group``). Both parts share one global grad norm, one clipping coefficient and one
AdamW step. With ep = 1 the expert groups are the dense ones, so flagged parameters simply join the
dense part and everything (buckets, collectives, checkpoint keys) is as without experts.
"""
from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .grad_buffer import GradBuffer, _all_gather
from .layout import ParallelLayout, group_size


@dataclass(frozen=True)
class _Segment:
    """A piece of one parameter inside this rank's owned range of the flat buffer."""

    slot: int
    flat_lo: int
    flat_hi: int
    shard_lo: int
    weight: float
    decay: bool


def replica_multiplicity(specs, mp_group) -> list[int]:
    """How many times the model replica holds each spec's exact (name, range).

    Ranges of one name must be identical or disjoint across the replica (replicated norms, KV heads
    replicated when tp exceeds them and tied embeddings are identical; TP shards are disjoint), so a
    count per (name, range) weights every element exactly once. Collective over ``mp_group``.
    """
    keys = [(s.name, s.full_shape, s.dim, s.start, s.stop) for s in specs]
    if group_size(mp_group) > 1:
        gathered = [None] * dist.get_world_size(mp_group)
        dist.all_gather_object(gathered, keys, group=mp_group)
    else:
        gathered = [keys]
    counts = collections.Counter(k for rank_keys in gathered for k in rank_keys)
    by_name = collections.defaultdict(set)
    for k in counts:
        by_name[k[0]].add(k)
    for name, variants in by_name.items():
        if len({(k[1], k[2]) for k in variants}) > 1:
            raise ValueError(f"parameter {name}: ranks of one model replica disagree on its full shape "
                             f"or split dim ({sorted(variants, key=str)}): give its copies one ShardSpec")
        ranges = sorted((k[3], k[4]) for k in variants if k[2] is not None)
        for (a0, a1), (b0, _) in zip(ranges, ranges[1:]):
            if b0 < a1:
                raise ValueError(f"parameter {name}: ranges [{a0},{a1}) and [{b0},...) partly overlap "
                                 "across the model replica: shards must be identical or disjoint")
    return [counts[k] for k in keys]


def _default_decay(name: str, param) -> bool:
    # Norm scales and biases (1-D) are conventionally not decayed.
    return len(param.shard_spec.full_shape) >= 2


class _Part:
    """Parameters whose gradients are summed over one group (``sum_group``): their flat grad buffer,
    the ranges of it this rank owns (all of it, or under ZeRO-1 its chunk of every bucket), and fp32
    master weights and Adam moments for those ranges. ``replica_group`` holds one copy of each of
    these parameters; duplicates within it are weighted 1/count in the norm. Collective over
    ``replica_group``."""

    def __init__(self, named, *, sum_group, replica_group, zero1: bool, decays: dict, device,
                 bucket_numel: int, overlap: bool, use_reduce_scatter: bool):
        counts = replica_multiplicity([p.shard_spec for _, p in named], replica_group)
        self.replica_group, self.zero1 = replica_group, zero1
        self.grads = GradBuffer(named, dp_group=sum_group, bucket_numel=bucket_numel,
                                deferred={id(p) for (_, p), k in zip(named, counts) if k > 1},
                                shard=zero1, overlap=overlap, use_reduce_scatter=use_reduce_scatter,
                                device=device)
        weight = {id(p): 1.0 / k for (_, p), k in zip(named, counts)}
        self.owned, self.segments = self._plan_shard(weight, decays)
        n = sum(hi - lo for lo, hi, _ in self.owned)
        self.master = torch.zeros(n, dtype=torch.float32, device=device)
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        with torch.no_grad():
            for seg in self.segments:
                slot = self.grads.slots[seg.slot]
                lo = seg.flat_lo - slot.offset
                src = slot.param.detach().reshape(-1)[lo:lo + seg.flat_hi - seg.flat_lo]
                self.master[seg.shard_lo:seg.shard_lo + seg.flat_hi - seg.flat_lo].copy_(src)

    def _plan_shard(self, weight, decays):
        """Owned flat ranges per bucket (lo, hi, shard offset) and the param segments inside them."""
        owned, segments, shard = [], [], 0
        g = self.grads
        for b in g.buckets:
            lo, hi = b.chunk(g.dp_rank, g.dp_size) if self.zero1 else (b.start, b.stop)
            owned.append((lo, hi, shard))
            for si in b.slots:
                s = g.slots[si]
                a, z = max(lo, s.offset), min(hi, s.offset + s.numel)
                if a < z:
                    segments.append(_Segment(si, a, z, shard + a - lo, weight[id(s.param)],
                                             decays[id(s.param)]))
            shard += hi - lo
        return owned, segments

    def views(self, t: torch.Tensor, shard: bool):
        return [t[so:so + hi - lo] if shard else t[lo:hi] for lo, hi, so in self.owned]

    def decayed(self):
        return [self.master[s.shard_lo:s.shard_lo + s.flat_hi - s.flat_lo]
                for s in self.segments if s.decay]

    def sum_of_squares(self) -> torch.Tensor:
        """Σ weight·grad² over this rank's owned segments (synced grads)."""
        by_weight = collections.defaultdict(list)
        for seg in self.segments:
            by_weight[seg.weight].append(self.grads.data[seg.flat_lo:seg.flat_hi])
        total = torch.zeros((), dtype=torch.float32, device=self.grads.data.device)
        for w, views in by_weight.items():
            total += w * torch.stack(torch._foreach_norm(views)).square().sum()
        return total

    @torch.no_grad()
    def write_params(self):
        """Copy master values into the params (cast); under ZeRO-1 all-gather each bucket first."""
        g = self.grads
        gather = self.zero1 and g.dp_size > 1
        pending = collections.deque()
        for b, (lo, hi, so) in zip(g.buckets, self.owned):
            own = self.master[so:so + hi - lo]
            if gather:
                full = torch.empty(b.numel, dtype=b.dtype, device=g.data.device)
                mine = full[lo - b.start:hi - b.start]
                mine.copy_(own)
                work = _all_gather(full, mine, group=g.dp_group, async_op=True)
            else:
                full, work = own, None
            pending.append((b, full, work))
            # Two buckets in flight bound the temporary memory while still overlapping.
            while len(pending) > (2 if gather else 0):
                self._scatter_into_params(*pending.popleft())
        while pending:
            self._scatter_into_params(*pending.popleft())

    def _scatter_into_params(self, bucket, full, work):
        if work is not None:
            work.wait()
        for si in bucket.slots:
            s = self.grads.slots[si]
            a = s.offset - bucket.start
            s.param.detach().view(-1).copy_(full[a:a + s.numel])


class DistributedOptimizer:
    """AdamW (torch.optim.AdamW's arithmetic) over ``named_params`` with a flat grad buffer.

    ``named_params``: (name, param) pairs, each param carrying ``param.shard_spec``; params with
    ``requires_grad=False`` are skipped. Params with ``param.expert_parallel = True`` are one
    expert's weights: under ep > 1 their grads are summed over ``layout.edp_group`` (ranks of one
    edp group must hold the same expert params, in the same order), not dp. ``zero1`` shards master
    weights and moments over dp (expert ones over edp). ``bucket_mb`` is the fp32 grad bucket size.
    ``max_grad_norm`` clips by the global norm over every unique element of the model, dense and
    expert, with one coefficient. ``overlap`` starts bucket reductions during backward (pass
    ``no_sync`` to the schedule). ``decay_filter(name, param) -> bool`` picks params that get weight
    decay (default: ≥2-D). ``use_reduce_scatter=False`` makes ZeRO-1 all-reduce and slice, for
    backends without a reduce-scatter. Construction is collective over the layout.
    """

    def __init__(self, named_params, layout: ParallelLayout, *, lr: float, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, zero1: bool = False,
                 bucket_mb: float = 25.0, max_grad_norm: float | None = None, overlap: bool = False,
                 decay_filter=None, use_reduce_scatter: bool = True):
        self.layout = layout
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(betas), eps, weight_decay
        self.zero1, self.max_grad_norm = zero1, max_grad_norm
        self.step_count = 0
        seen, named = set(), []
        for name, p in named_params:
            if p.requires_grad and id(p) not in seen:
                if getattr(p, "shard_spec", None) is None:
                    raise ValueError(f"parameter {name} has no shard_spec: every parameter needs one")
                if not p.is_contiguous():
                    raise ValueError(f"parameter {name} is not contiguous: the optimizer writes it flat")
                seen.add(id(p))
                named.append((name, p))
        decay_filter = decay_filter or _default_decay
        decays = {id(p): bool(decay_filter(n, p)) for n, p in named}
        self.device = named[0][1].device if named else torch.device("cpu")
        kw = dict(zero1=zero1, decays=decays, device=self.device, overlap=overlap,
                  bucket_numel=int(bucket_mb * 2**20) // 4, use_reduce_scatter=use_reduce_scatter)
        # Decided by the layout alone, so every rank builds the same parts (and issues the same
        # collectives), including a pipeline stage that holds no experts.
        split = layout.ep_size > 1
        apart = [split and bool(getattr(p, "expert_parallel", False)) for _, p in named]
        expert = [np for np, e in zip(named, apart) if e]
        dense = [np for np, e in zip(named, apart) if not e]
        self.dense = _Part(dense, sum_group=layout.dp_group, replica_group=layout.mp_group, **kw)
        self.expert = (_Part(expert, sum_group=layout.edp_group, replica_group=layout.expert_mp_group,
                             **kw) if split else None)
        self._parts = [self.dense] + ([self.expert] if split else [])
        self._offloaded = False

    # The dense part's buffer and state, under the names they had before experts (tools and tests
    # read them).
    grads = property(lambda self: self.dense.grads)
    master = property(lambda self: self.dense.master)
    exp_avg = property(lambda self: self.dense.exp_avg)
    exp_avg_sq = property(lambda self: self.dense.exp_avg_sq)
    _segments = property(lambda self: self.dense.segments)

    # ---- gradients ---------------------------------------------------------------------------
    def zero_grad(self):
        for part in self._parts:
            part.grads.zero()

    @contextlib.contextmanager
    def no_sync(self):
        """Context manager: accumulate grads without starting reductions (overlap mode)."""
        with contextlib.ExitStack() as stack:
            for part in self._parts:
                stack.enter_context(part.grads.no_sync())
            yield

    def reduce_grads(self):
        """Start the dp (edp) SUM of every bucket not yet started (asynchronous)."""
        for part in self._parts:
            part.grads.reduce()

    def finish_grad_sync(self):
        """Wait for the SUMs; this rank's owned ranges of the buffers then hold the full gradient."""
        for part in self._parts:
            part.grads.finish()

    def grad_norm(self) -> float:
        """Global L2 norm over every unique element of the model's (synced) grads. Collective."""
        local = [part.sum_of_squares() for part in self._parts]
        if self.zero1:
            # ZeRO-1 chunks are disjoint over dp (experts' over edp): the layout sums each element once.
            reduce = [(self.layout.group, sum(local))]
        else:  # plain DP replicas hold the same grads: count one replica of each part
            reduce = [(part.replica_group, t) for part, t in zip(self._parts, local)]
        for group, t in reduce:
            if group_size(group) > 1:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return math.sqrt(sum(t for _, t in reduce).item())

    # ---- update ------------------------------------------------------------------------------
    def set_lr(self, lr: float):
        self.lr = float(lr)

    def step(self) -> dict:
        """Sync grads if not yet done, clip, AdamW on the owned ranges, write params. Collective."""
        if self._offloaded:
            raise RuntimeError("optimizer state is offloaded: call reload() before step()")
        self.finish_grad_sync()
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return {"grad_norm": norm, "lr": self.lr, "skipped": True}
        grads = [v for part in self._parts for v in part.views(part.grads.data, shard=False)]
        if self.max_grad_norm is not None:
            coef = self.max_grad_norm / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s epsilon
            if coef < 1.0:
                torch._foreach_mul_(grads, coef)
        self.step_count += 1
        self._adamw(grads)
        for part in self._parts:
            part.write_params()
        return {"grad_norm": norm, "lr": self.lr, "skipped": False}

    @torch.no_grad()
    def _adamw(self, grads):
        b1, b2 = self.betas
        masters, ms, vs = ([v for p in self._parts for v in p.views(getattr(p, name), shard=True)]
                           for name in ("master", "exp_avg", "exp_avg_sq"))
        if self.weight_decay:
            decayed = [v for part in self._parts for v in part.decayed()]
            if decayed:
                torch._foreach_mul_(decayed, 1.0 - self.lr * self.weight_decay)
        torch._foreach_lerp_(ms, grads, 1.0 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1.0 - b2)
        bc1 = 1.0 - b1 ** self.step_count
        bc2_sqrt = math.sqrt(1.0 - b2 ** self.step_count)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(masters, ms, denom, value=-self.lr / bc1)

    # ---- state -------------------------------------------------------------------------------
    def optimizer_state_bytes(self) -> int:
        """Bytes of fp32 master weights and Adam moments held by this rank."""
        return sum(t.numel() * t.element_size() for part in self._parts
                   for t in (part.master, part.exp_avg, part.exp_avg_sq))

    def _state_key(self, part=None) -> str:
        # Coordinates make shards unique per rank for torch.distributed.checkpoint; plain-DP replicas
        # share a key so DCP writes their identical state once. Sizes make a resume in another
        # layout fail on a missing key instead of loading the wrong shard. Expert state also differs
        # per ep rank (other experts), and ZeRO-1 shards it over edp rather than dp.
        L, c = self.layout, self.layout.coord
        key = f"tp{c.tp}of{L.tp_size}_pp{c.pp}of{L.pp_size}"
        expert = part is not None and part is self.expert
        if expert:
            key += f"_ep{c.ep}of{L.ep_size}"
        axis, rank, size = ("edp", c.edp, L.dp_size // L.ep_size) if expert else ("dp", c.dp, L.dp_size)
        if self.zero1 and size > 1:
            key += f"_{axis}{rank}of{size}"
        return ("expert_" if expert else "") + ("zero1_" if self.zero1 else "dp_") + key

    def _saved_parts(self):
        # A rank without expert params (a pipeline stage of dense layers) saves no expert entry.
        return [p for p in self._parts if p is self.dense or p.grads.slots]

    def state_dict(self) -> dict:
        """Live tensors keyed by this rank's shard, for ``torch.distributed.checkpoint``::

            dcp.save({"optim": opt.state_dict()}, checkpoint_id=path)
            sd = {"optim": opt.state_dict()}; dcp.load(sd, checkpoint_id=path)
            opt.load_state_dict(sd["optim"])

        DCP loads into these tensors in place. Parameters are not written: they come from the
        model's own checkpoint (taken at the same step, they equal the masters in their dtype).
        The dense entry carries step and lr; an expert entry (ep > 1) only its tensors.
        """
        out = {self._state_key(p): {"master": p.master, "exp_avg": p.exp_avg, "exp_avg_sq": p.exp_avg_sq}
               for p in self._saved_parts()}
        out[self._state_key()].update(step=torch.tensor(self.step_count, dtype=torch.int64),
                                      lr=torch.tensor(self.lr, dtype=torch.float64))
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict):
        for part in self._saved_parts():
            key = self._state_key(part)
            if key not in state:
                raise KeyError(f"optimizer state has no shard {key} (has {sorted(state)}): resume in "
                               "the layout that saved it")
            s = state[key]
            for name in ("master", "exp_avg", "exp_avg_sq"):
                dst = getattr(part, name)
                if s[name] is not dst:
                    if s[name].shape != dst.shape:
                        raise ValueError(f"optimizer {name} of {key}: saved shape {tuple(s[name].shape)} "
                                         f"!= {tuple(dst.shape)}: parameters or bucket_mb differ from "
                                         "the save")
                    dst.copy_(s[name])
        s = state[self._state_key()]
        self.step_count = int(s["step"])
        self.lr = float(s["lr"])

    def close(self):
        """Release the parameters (grad hooks, ``main_grad``), e.g. before building another
        optimizer over them after a reallocation."""
        for part in self._parts:
            part.grads.close()

    def offload(self, grads: bool = True):
        """Move master weights and moments to host memory; optionally free the grad buffers too."""
        if self._offloaded:
            return
        for part in self._parts:
            for name in ("master", "exp_avg", "exp_avg_sq"):
                setattr(part, name, getattr(part, name).to("cpu"))
            if grads:
                part.grads.release()
        self._offloaded = True

    def reload(self):
        if not self._offloaded:
            return
        for part in self._parts:
            for name in ("master", "exp_avg", "exp_avg_sq"):
                setattr(part, name, getattr(part, name).to(self.device))
            part.grads.restore()
        self._offloaded = False
