"""Conjugate autograd pairs over a tensor-parallel group (Megatron core's tensor_parallel/mappings.py
is the model). Each forward collective has its adjoint as backward, so a layer's gradient equals the
unsharded one. ``group=None`` means a group of one: every mapping is then the identity."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import group_rank, group_size


def _backend_is_gloo(group) -> bool:
    return dist.get_backend(group) == "gloo"


def all_gather_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def group_max(values: list[int], group, device=None) -> list[int]:
    """The elementwise maximum of small integers over a group (a host-side agreement)."""
    if group_size(group) == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def reduce_scatter_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum over the group, keep this rank's equal piece along ``dim``."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:  # chunk() would silently make unequal (or too few) pieces
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split into {n} parts")
    if _backend_is_gloo(group):  # gloo has no reduce_scatter: reduce everything, keep our piece
        full = x.contiguous().clone()
        dist.all_reduce(full, group=group)
        return full.chunk(n, dim=dim)[group_rank(group)].contiguous()
    inputs = [c.contiguous() for c in x.chunk(n, dim=dim)]
    out = torch.empty_like(inputs[0])
    dist.reduce_scatter(out, inputs, group=group)
    return out


def split_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split into {n} parts")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g.contiguous().clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    """Keep this rank's piece of the last dim forward; all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_dim(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather_dim(g, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along the last dim forward; keep this rank's piece backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return split_dim(g, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    """Keep this rank's piece of the token dim forward; all-gather backward (sequence parallel)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_dim(x, 0, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather_dim(g, 0, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    """All-gather along the token dim forward; reduce-scatter backward (the input feeds a
    column-parallel layer, whose input gradient is a partial sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim(x, 0, group)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter_dim(g, 0, ctx.group), None


class _GatherFromSequenceReplicatedGrad(torch.autograd.Function):
    """All-gather along the token dim forward; keep this rank's piece backward (every rank computes
    the same thing from the gathered tensor, so its upstream gradient is already the whole one)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim(x, 0, group)

    @staticmethod
    def backward(ctx, g):
        return split_dim(g, 0, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Reduce-scatter along the token dim forward; all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim(x, 0, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather_dim(g, 0, ctx.group), None


def all_to_all_rows(x: torch.Tensor, out_rows: list[int], in_rows: list[int], group) -> torch.Tensor:
    """Rows ``x[sum(in_rows[:r]):...]`` go to group rank r; rank r's rows for us arrive in rank
    order, ``out_rows[r]`` of them."""
    out = x.new_empty((sum(out_rows), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(out_rows),
                           input_split_sizes=list(in_rows), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows exchanged with ``all_to_all_rows``; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_rows, in_rows, group):
        ctx.rows, ctx.group = (out_rows, in_rows), group
        return all_to_all_rows(x, out_rows, in_rows, group)

    @staticmethod
    def backward(ctx, g):
        out_rows, in_rows = ctx.rows
        return all_to_all_rows(g, in_rows, out_rows, ctx.group), None, None, None


def _apply(fn, x, group):
    return x if group_size(group) == 1 else fn.apply(x, group)


def copy_to_tp(x, group):
    return _apply(_CopyToTP, x, group)


def reduce_from_tp(x, group):
    return _apply(_ReduceFromTP, x, group)


def scatter_to_tp(x, group):
    return _apply(_ScatterToTP, x, group)


def gather_from_tp(x, group):
    return _apply(_GatherFromTP, x, group)


def scatter_to_sequence(x, group):
    return _apply(_ScatterToSequence, x, group)


def gather_from_sequence(x, group, *, grad_is_partial=True):
    """``grad_is_partial``: the consumer is tensor-parallel (a column-parallel matmul), so each
    rank's upstream gradient is a partial sum to reduce-scatter. Pass False when every rank computes
    the same replicated result from the gathered tensor (a scalar value head): backward then keeps
    this rank's piece, where a reduce-scatter would multiply the gradient by the tp size."""
    return _apply(_GatherFromSequence if grad_is_partial else _GatherFromSequenceReplicatedGrad,
                  x, group)


def all_to_all(x, out_rows, in_rows, group):
    """Expert dispatch and combine (its own adjoint with the splits swapped)."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, list(out_rows), list(in_rows), group)


def reduce_scatter_to_sequence(x, group):
    return _apply(_ReduceScatterToSequence, x, group)
