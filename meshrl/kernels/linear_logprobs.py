"""Token log-probs and entropy straight from hidden states and a (vocab-parallel) output weight.

The logits are produced one [rows, cols] chunk at a time by a plain matmul (cuBLAS on GPU) and
reduced at once to per-row partials by the same primitive `token_logprobs` uses, so [N, V] logits
never exist. Vocabulary chunks are combined exactly like tensor-parallel shards. Backward recomputes
each chunk's logits, turns them into their gradient with the logits kernel and does two matmuls.
"""
from __future__ import annotations

import torch

from .dispatch import use_triton
from .logprobs import (combine_partials, finalize, logits_grad, reduce_partials, row_partials,
                       shard_bounds)

# Logit elements per chunk. GPU: 2^27 bf16 is 256 MiB, wide enough that each matmul runs at full
# speed; the torch path copies a chunk to fp32 more than once, so it keeps chunks at 16 MiB.
TRITON_CHUNK_ELEMS = 1 << 27
TORCH_CHUNK_ELEMS = 1 << 22
# Chunks span at least this many vocabulary columns (when the vocabulary has them) before rows are
# split, so a very long batch becomes more row chunks rather than thin matmuls.
_MIN_CHUNK_COLS = 4096


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          temperature: float = 1.0, return_entropy: bool = False, tp_group=None,
                          vocab_size: int | None = None, max_chunk_elems: int | None = None):
    """fp32 log softmax(hidden @ weightᵀ / T)[labels] ([N]), and the entropy [N] when asked.

    hidden [N, H]; weight [V_local, H] holds rows [r·V_local, (r+1)·V_local) of the output layer on
    rank r of `tp_group`; rows at or past `vocab_size` are padding and are ignored. Under TP the
    gradient for `hidden` is this rank's partial sum: the caller reduces it across `tp_group`.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [N, H] and weight {tuple(weight.shape)} [V, H]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [N] for hidden {tuple(hidden.shape)}")
    offset, n_valid = shard_bounds(weight.shape[0], tp_group, vocab_size)
    if max_chunk_elems is None:
        max_chunk_elems = TRITON_CHUNK_ELEMS if use_triton(hidden) else TORCH_CHUNK_ELEMS
    chunks = chunk_shape(hidden.shape[0], n_valid, max_chunk_elems)
    logp, ent = _LinearTokenLogprobs.apply(hidden, weight, labels, 1.0 / temperature, offset, n_valid,
                                           tp_group, chunks)
    return (logp, ent) if return_entropy else logp


def chunk_shape(n_rows: int, n_cols: int, max_elems: int) -> tuple[int, int]:
    """(rows, cols) of a logits chunk holding at most `max_elems` elements."""
    rows = max(1, min(n_rows, max_elems // max(1, min(n_cols, _MIN_CHUNK_COLS))))
    cols = max(1, min(n_cols, max_elems // rows))
    return rows, cols


def _spans(n: int, step: int):
    return [(i, min(i + step, n)) for i in range(0, n, step)]


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_t, offset, n_valid, tp_group, chunks):
        rows, cols = chunks
        n = hidden.shape[0]
        parts = torch.empty((4, n), dtype=torch.float32, device=hidden.device)
        for r0, r1 in _spans(n, rows):
            per_cols = []
            for c0, c1 in _spans(n_valid, cols):
                logits = hidden[r0:r1] @ weight[c0:c1].T
                per_cols.append(row_partials(logits, labels[r0:r1], inv_t, offset + c0, c1 - c0))
                del logits  # free before the next chunk's matmul allocates
            if per_cols:
                parts[:, r0:r1] = combine_partials(torch.stack(per_cols))
            else:  # this rank holds only padding
                parts[:, r0:r1] = torch.tensor([-1.0e30, 0.0, 0.0, 0.0], device=hidden.device)[:, None]
        logp, ent, lse = finalize(reduce_partials(parts, tp_group))
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.geometry = (inv_t, offset, n_valid, chunks)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        inv_t, offset, n_valid, (rows, cols) = ctx.geometry
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        g_ent = torch.zeros_like(lse) if g_ent is None else g_ent.float().contiguous()
        want_h, want_w = ctx.needs_input_grad[:2]
        # fp32 accumulator for hidden: it sums one matmul per vocabulary chunk, and bf16 rounding
        # at every step would cost accuracy. The weight chunk's gradient is one matmul per row chunk.
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None  # padded rows keep a zero gradient
        n = hidden.shape[0]
        for c0, c1 in _spans(n_valid, cols):
            w = weight[c0:c1]
            for r0, r1 in _spans(n, rows):
                h = hidden[r0:r1]
                logits = h @ w.T
                g = logits_grad(logits, labels[r0:r1], lse[r0:r1], ent[r0:r1], g_lp[r0:r1],
                                g_ent[r0:r1], inv_t, offset + c0, c1 - c0)
                del logits
                if want_h:
                    grad_h[r0:r1] += g @ w
                if want_w:
                    if r0 == 0:
                        torch.mm(g.T, h, out=grad_w[c0:c1])
                    else:
                        grad_w[c0:c1].addmm_(g.T, h)
                del g
        grad_h = grad_h.to(hidden.dtype) if want_h else None
        return grad_h, grad_w, None, None, None, None, None, None
