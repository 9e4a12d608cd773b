"""Token log-probs and entropy from (vocab-sharded) logits without an fp32 [N, V] temporary.

Every path reduces a block of vocabulary columns to four per-row partials: the max m, the sum-exp
s = Σ e^(z−m), t = Σ e^(z−m)·(z−m) and the label logit (0 where the label is not in the block).
Partials from vocabulary chunks or tensor-parallel ranks combine exactly (`combine_partials`), which
is how sharded logits give the unsharded result on every rank. Backward recomputes the softmax from
the saved logits, log-sum-exp and entropy, so it needs no communication.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import logprobs_triton
from .dispatch import use_triton

# fp32 elements per chunk temporary on the torch path (16 MiB): small next to any real N×V.
TORCH_CHUNK_ELEMS = 1 << 22
_NEG_BIG = -1.0e30  # see logprobs_triton: a finite empty max keeps 0·(m − m_new) from being NaN


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, tp_group=None, vocab_size: int | None = None):
    """fp32 log softmax(logits / T)[labels] ([N]), and the entropy [N] when `return_entropy`.

    logits [N, V_local] hold columns [r·V_local, (r+1)·V_local) of the vocabulary on rank r of
    `tp_group`; labels [N] are global ids. Columns at or past `vocab_size` (padding) are ignored.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} must be [N, V] and labels {tuple(labels.shape)} [N]")
    offset, n_valid = shard_bounds(logits.shape[1], tp_group, vocab_size)
    logp, ent = _TokenLogprobs.apply(logits, labels, 1.0 / temperature, offset, n_valid, tp_group)
    return (logp, ent) if return_entropy else logp


def shard_bounds(v_local: int, tp_group, vocab_size: int | None) -> tuple[int, int]:
    """(global id of this rank's first column, how many of its columns are real vocabulary)."""
    rank = dist.get_rank(tp_group) if _group_size(tp_group) > 1 else 0
    offset = rank * v_local
    n_valid = v_local if vocab_size is None else max(0, min(v_local, vocab_size - offset))
    return offset, n_valid


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


# --- combining partials -----------------------------------------------------------------------------

def combine_partials(parts: torch.Tensor) -> torch.Tensor:
    """[K, 4, N] partials over disjoint column sets -> [4, N] partials over their union."""
    m_k, s_k, t_k, zl_k = parts.unbind(1)
    m = m_k.amax(0)
    w = torch.exp(m_k - m)
    s = (w * s_k).sum(0)
    t = (w * (t_k + (m_k - m) * s_k)).sum(0)
    return torch.stack([m, s, t, zl_k.sum(0)])


def reduce_partials(parts: torch.Tensor, tp_group) -> torch.Tensor:
    """Combine this rank's [4, N] partials with every rank's in `tp_group`; identical on all ranks."""
    size = _group_size(tp_group)
    if size == 1:
        return parts
    # One all-gather of 4·N floats instead of a MAX then a SUM all-reduce: one latency, and every
    # rank combines the same numbers in the same order, so the results agree bit for bit.
    gathered = [torch.empty_like(parts) for _ in range(size)]
    dist.all_gather(gathered, parts.contiguous(), group=tp_group)
    return combine_partials(torch.stack(gathered))


def finalize(parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse) from whole-vocabulary partials."""
    m, s, t, zl = parts.unbind(0)
    log_s = torch.log(s)
    lse = m + log_s
    return zl - lse, log_s - t / s, lse


# --- dispatching the two per-row primitives ---------------------------------------------------------

def row_partials(logits, labels, inv_t: float, offset: int, n_valid: int) -> torch.Tensor:
    """[4, N] partials of this block of columns (see the module docstring)."""
    if use_triton(logits, labels):
        return logprobs_triton.row_stats(_rowmajor(logits), labels.contiguous(), inv_t, offset,
                                         n_valid, finalize=False)
    return _partials_torch(logits, labels, inv_t, offset, n_valid)


def logits_grad(logits, labels, lse, ent, g_lp, g_ent, inv_t: float, offset: int,
                n_valid: int) -> torch.Tensor:
    """d(Σ g_lp·logp + g_ent·H)/d logits, in the logits' dtype; columns past n_valid get 0."""
    if use_triton(logits, labels):
        return logprobs_triton.logits_grad(_rowmajor(logits), labels.contiguous(), lse, ent, g_lp,
                                           g_ent, inv_t, offset, n_valid)
    return _grad_torch(logits, labels, lse, ent, g_lp, g_ent, inv_t, offset, n_valid)


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _owned_label_logit(logits, labels, offset: int, n_valid: int) -> torch.Tensor:
    local = labels.long() - offset
    own = (local >= 0) & (local < n_valid)
    picked = logits.gather(1, local.clamp(0, max(n_valid - 1, 0)).unsqueeze(1)).squeeze(1).float()
    return torch.where(own, picked, 0.0)


def _row_chunk(n_cols: int) -> int:
    return max(1, TORCH_CHUNK_ELEMS // max(n_cols, 1))


def _partials_torch(logits, labels, inv_t, offset, n_valid):
    n = logits.shape[0]
    out = torch.zeros((4, n), dtype=torch.float32, device=logits.device)
    out[0] = _NEG_BIG
    if n_valid > 0 and n > 0:
        out[3] = _owned_label_logit(logits, labels, offset, n_valid) * inv_t
    step = _row_chunk(n_valid)
    for r0 in range(0, n if n_valid > 0 else 0, step):
        z = logits[r0:r0 + step, :n_valid].to(torch.float32, copy=True)  # one chunk-sized copy...
        if inv_t != 1.0:
            z.mul_(inv_t)
        m = z.amax(1).clamp_min(_NEG_BIG)
        z.sub_(m[:, None])  # ...reused in place for z − m
        e = z.exp()
        z.masked_fill_(e == 0, 0.0)  # −inf columns: e·(z−m) would be 0·(−inf)
        out[0, r0:r0 + step] = m
        out[1, r0:r0 + step] = e.sum(1)
        out[2, r0:r0 + step] = torch.linalg.vecdot(e, z)
        del z, e  # free this chunk's temporaries before the next chunk allocates its own
    return out


def _grad_torch(logits, labels, lse, ent, g_lp, g_ent, inv_t, offset, n_valid):
    n, n_cols = logits.shape
    grad = torch.zeros_like(logits)
    local = labels.long() - offset
    own = (local >= 0) & (local < n_valid)
    step = _row_chunk(n_valid)
    for r0 in range(0, n if n_valid > 0 else 0, step):
        rows = slice(r0, r0 + step)
        z = logits[rows, :n_valid].to(torch.float32, copy=True)  # copy: fp32 input must stay intact
        if inv_t != 1.0:
            z.mul_(inv_t)
        z.sub_(lse[rows, None])  # log p
        p = z.exp()
        z.masked_fill_(p == 0, 0.0).add_(ent[rows, None])  # log p + H, with 0·(−inf) kept out
        g = z.mul_(p).mul_(g_ent[rows, None]).addcmul_(p, g_lp[rows, None]).neg_()
        hit = own[rows].nonzero().squeeze(1)
        g[hit, local[rows][hit]] += g_lp[rows][hit].float()
        grad[rows, :n_valid] = g.mul_(inv_t)
        del z, p, g
    return grad


# --- autograd -----------------------------------------------------------------------------------------

class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, inv_t, offset, n_valid, tp_group):
        if use_triton(logits, labels) and _group_size(tp_group) == 1:
            # Single shard: the kernel finishes logp/H/lse itself, saving the small combine ops.
            logp, ent, lse = logprobs_triton.row_stats(_rowmajor(logits), labels.contiguous(), inv_t,
                                                       offset, n_valid, finalize=True)
        else:
            parts = reduce_partials(row_partials(logits, labels, inv_t, offset, n_valid), tp_group)
            logp, ent, lse = finalize(parts)
        ctx.save_for_backward(logits, labels, lse, ent)
        ctx.geometry = (inv_t, offset, n_valid)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, labels, lse, ent = ctx.saved_tensors
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        g_ent = torch.zeros_like(lse) if g_ent is None else g_ent.float().contiguous()
        grad = logits_grad(logits, labels, lse, ent, g_lp, g_ent, *ctx.geometry)
        return grad, None, None, None, None, None
