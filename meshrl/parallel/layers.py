"""Tensor-parallel layers. Each parameter carries its ShardSpec (``param.shard_spec``); names are
filled in by the owning model (``name_shard_specs``), since a layer does not know its own path.

A parameter whose gradient is a partial sum over the tensor-parallel group (norm weights under
sequence parallelism, K/V heads replicated because tp exceeds their number) is flagged
``param.tp_partial_grad = True``; ``sync_tp_partial_grads`` completes those sums.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from . import mappings
from .layout import ParallelLayout
from .sharding import ShardSpec, padded_size, split_range


def _param(shape, spec: ShardSpec, *, dtype, device, partial=False) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
    p.shard_spec = spec
    p.tp_partial_grad = partial
    return p


def replicated_param(shape, *, dtype=None, device=None, partial=False) -> nn.Parameter:
    """A parameter every tp rank holds whole (norm weights, value heads)."""
    return _param(tuple(shape), ShardSpec("", tuple(shape)), dtype=dtype, device=device,
                  partial=partial)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W split by output rows; each rank produces its columns of y.

    ``out_range`` overrides the even split (K/V heads replicated when tp exceeds their count)."""

    def __init__(self, in_features: int, out_features: int, layout: ParallelLayout, *, bias=False,
                 gather_output=False, sequence_parallel=False, out_range=None, dtype=None,
                 device=None):
        super().__init__()
        self.group = layout.tp_group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        even = split_range(out_features, layout.tp_size, layout.tp_rank)
        start, stop = out_range or even
        replicated = (stop - start) * layout.tp_size != out_features
        rows = stop - start
        self.weight = _param((rows, in_features),
                             ShardSpec("", (out_features, in_features), 0, start, stop),
                             dtype=dtype, device=device, partial=replicated)
        self.bias = None
        if bias:
            self.bias = _param((rows,), ShardSpec("", (out_features,), 0, start, stop),
                               dtype=dtype, device=device, partial=replicated)

    def enter(self, x):
        """``x`` brought into the tensor-parallel region: a copy whose gradient is all-reduced, or
        under sequence parallelism an all-gather of the tokens (a reduce-scatter backward). Linears
        sharing an input (q, k, v; gate, up) enter it once and take ``entered=True``: one
        collective each way per input, as the cost model counts, not one per linear."""
        if self.sequence_parallel:
            return mappings.gather_from_sequence(x, self.group)
        return mappings.copy_to_tp(x, self.group)

    def forward(self, x, entered: bool = False):
        if not entered:
            x = self.enter(x)
        y = F.linear(x, self.weight, self.bias)
        return mappings.gather_from_tp(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x Wᵀ + b with W split by input columns; partial products are summed over tp (or
    reduce-scattered over tokens under sequence parallelism). The bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, layout: ParallelLayout, *, bias=False,
                 input_is_parallel=True, sequence_parallel=False, dtype=None, device=None):
        super().__init__()
        self.group = layout.tp_group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        start, stop = split_range(in_features, layout.tp_size, layout.tp_rank)
        self.weight = _param((out_features, stop - start),
                             ShardSpec("", (out_features, in_features), 1, start, stop),
                             dtype=dtype, device=device)
        self.bias = None
        if bias:
            self.bias = replicated_param((out_features,), dtype=dtype, device=device,
                                         partial=sequence_parallel)

    def forward(self, x):
        if not self.input_is_parallel:
            x = mappings.scatter_to_tp(x, self.group)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence(y, self.group)
        else:
            y = mappings.reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding split by vocabulary rows (padded to a multiple of tp); ids outside this rank's range
    contribute zeros and the tp sum assembles the full lookup."""

    def __init__(self, vocab_size: int, hidden: int, layout: ParallelLayout, *,
                 sequence_parallel=False, dtype=None, device=None):
        super().__init__()
        self.group = layout.tp_group
        self.sequence_parallel = sequence_parallel
        padded = padded_size(vocab_size, layout.tp_size)
        self.start, self.stop = split_range(padded, layout.tp_size, layout.tp_rank)
        self.weight = _param((self.stop - self.start, hidden),
                             ShardSpec("", (vocab_size, hidden), 0, self.start, self.stop),
                             dtype=dtype, device=device)

    def forward(self, ids):
        if mappings.group_size(self.group) == 1:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.start) | (ids >= self.stop)
            local = (ids - self.start).masked_fill(outside, 0)
            out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence(out, self.group)
        return mappings.reduce_from_tp(out, self.group)


class VocabParallelOutput(nn.Module):
    """The LM head: logits for this rank's vocabulary columns, padded columns at −inf."""

    def __init__(self, hidden: int, vocab_size: int, layout: ParallelLayout, *,
                 sequence_parallel=False, dtype=None, device=None):
        super().__init__()
        self.group = layout.tp_group
        self.sequence_parallel = sequence_parallel
        self.vocab_size = vocab_size
        padded = padded_size(vocab_size, layout.tp_size)
        start, stop = split_range(padded, layout.tp_size, layout.tp_rank)
        self.valid_cols = max(0, min(stop, vocab_size) - start)
        self.weight = _param((stop - start, hidden),
                             ShardSpec("", (vocab_size, hidden), 0, start, stop),
                             dtype=dtype, device=device)

    def gather_input(self, h):
        """The hidden states as the head's matmul sees them (sequence-gathered, tp-conjugate)."""
        if self.sequence_parallel:
            return mappings.gather_from_sequence(h, self.group)
        return mappings.copy_to_tp(h, self.group)

    def forward(self, h):
        logits = F.linear(self.gather_input(h), self.weight)
        if self.valid_cols < logits.shape[-1]:
            logits = logits.masked_fill(
                torch.arange(logits.shape[-1], device=logits.device) >= self.valid_cols,
                float("-inf"))
        return logits


def name_shard_specs(module: nn.Module, prefix: str = "") -> dict[str, ShardSpec]:
    """Give every parameter's ShardSpec its full name; return {name: spec}."""
    specs = {}
    for name, p in module.named_parameters(prefix=prefix.rstrip(".")):
        spec = getattr(p, "shard_spec", None)
        if spec is None:
            spec = ShardSpec(name, tuple(p.shape))
        p.shard_spec = dataclasses.replace(spec, name=name)
        specs[name] = p.shard_spec
    return specs


def grad_of(p: torch.Tensor):
    """The gradient to synchronise: the data-parallel buffer's view when one is attached."""
    g = getattr(p, "main_grad", None)
    return p.grad if g is None else g


@torch.no_grad()
def sync_tp_partial_grads(params, group):
    """Complete the tp sums of flagged gradients. Replicated-range shards (K/V heads) are summed
    through a zero buffer of the full rows, so ranks holding different heads do not mix."""
    if mappings.group_size(group) == 1:
        return
    for p in params:
        g = grad_of(p)
        if not getattr(p, "tp_partial_grad", False) or g is None:
            continue
        spec = p.shard_spec
        if spec.dim is None:
            mappings.all_reduce(g, group)
            continue
        full = g.new_zeros(spec.full_shape)
        full[spec.full_index()] = g[spec.local_valid_index()]
        mappings.all_reduce(full, group)
        g[spec.local_valid_index()].copy_(full[spec.full_index()])
