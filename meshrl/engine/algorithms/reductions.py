"""Reductions over packed token tensors: per-sequence sums and globally normalised token means.

Tokens are packed 1D with ``cu_seqlens`` (int32 [B+1]); nothing here pads. A token-mean loss divides
by a *global* token count that the caller passes in (docs/architecture.md, "Invariants and contracts"): summing the
per-microbatch losses of any split then gives the same gradient as the whole batch.
"""
from __future__ import annotations

import torch

Count = int | float | torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 sums over thousands of tokens lose several digits; float64 callers keep float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def seq_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def seq_ids(cu_seqlens: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Sequence index of every packed token, int64 [N].

    ``num_tokens`` (= cu_seqlens[-1]) lets the op skip reading the total back from the device.
    """
    lengths = seq_lengths(cu_seqlens)
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(ids, lengths, output_size=num_tokens)


def segment_sum(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums of a packed [N] tensor -> [B]; differentiable, fp32 for bf16/fp16 input.

    index_add rather than cumsum differences: a prefix sum over a long pack loses the short
    sequences' digits to the running total.
    """
    if x.dim() != 1:
        raise ValueError(f"segment_sum expects a packed 1D tensor, got shape {tuple(x.shape)}")
    ids = seq_ids(cu_seqlens, x.numel())
    out = x.new_zeros(cu_seqlens.numel() - 1, dtype=acc_dtype(x.dtype))
    return out.index_add(0, ids, x.to(out.dtype))


def expand_to_tokens(per_seq: torch.Tensor, cu_seqlens: torch.Tensor,
                     num_tokens: int | None = None) -> torch.Tensor:
    """Broadcast a per-sequence [B] tensor to its tokens [N] (e.g. GRPO advantages)."""
    return torch.repeat_interleave(per_seq, seq_lengths(cu_seqlens), dim=0, output_size=num_tokens)


def last_token_index(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Index of each sequence's last packed token, int64 [B] (sequences must be non-empty)."""
    return cu_seqlens[1:].long() - 1


def check_nonempty(cu_seqlens: torch.Tensor) -> None:
    """Fail loudly on an empty sequence when that is free to check (host tensors only).

    On an accelerator the check would cost a host sync per call, so it is skipped there.
    """
    if cu_seqlens.device.type == "cpu" and bool((seq_lengths(cu_seqlens) <= 0).any()):
        raise ValueError("every sequence needs at least one token; cu_seqlens has an empty one")


def masked_sum(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of x where mask is set, accumulated in fp32 (float64 kept).

    torch.where rather than x*mask: a masked-out -inf or NaN (e.g. a prompt token's log-prob)
    would turn x*0 into NaN.
    """
    x = x.to(acc_dtype(x.dtype))
    if mask is not None:
        x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum()


def local_count(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Number of counted elements here, at least 1: an all-masked microbatch gives 0, not NaN."""
    if mask is None:
        return torch.tensor(max(x.numel(), 1), dtype=acc_dtype(x.dtype), device=x.device)
    return mask.sum().to(acc_dtype(x.dtype)).clamp_min(1)


def zero_masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x with masked-out elements set to 0, applied to a loss's *inputs*.

    Masking only the per-token loss is not enough for the backward: torch.where sends a zero
    gradient to the dropped branch, but 0 times a local derivative of inf (exp of a garbage
    log-ratio at a prompt position) is NaN.
    """
    if mask is None:
        return x
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the masked elements of this shard only (for metrics, not losses)."""
    return masked_sum(x, mask) / local_count(x, mask)


def token_mean(x: torch.Tensor, mask: torch.Tensor | None = None, *,
               num_tokens: Count | None = None) -> torch.Tensor:
    """sum(x over mask) / num_tokens, where num_tokens is the global count (default: the local one).

    Pass the count of the whole global batch (all microbatches, all DP ranks) for a loss whose
    gradient does not depend on how the batch was split.
    """
    if num_tokens is None:
        num_tokens = local_count(x, mask)
    elif not isinstance(num_tokens, torch.Tensor) and num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    return masked_sum(x, mask) / num_tokens
