"""GRPO: group-normalised rewards as advantages (no critic) and a clipped loss with k3 KL inside."""
from __future__ import annotations

import torch

from meshrl.engine.algorithms.ppo_losses import clipped_surrogate, kl_k3
from meshrl.engine.algorithms.reductions import (Count, acc_dtype, masked_mean, token_mean,
                                                 zero_masked)


def group_normalize(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r − group mean) / (group std + eps) over consecutive groups of ``group_size`` samples.

    rewards: [G·group_size], the k samples of each prompt contiguous. The std is the *sample*
    (unbiased, n − 1) std, as DeepSeekMath's GRPO and TRL's ``GRPOTrainer`` compute it
    (``Tensor.std`` default); so a group of rewards {0, 1} maps to ±1/√2, not ±1. A group whose
    samples all score the same gets advantage 0 (its std is 0, the numerator is 0).
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a sample std, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1D with a multiple of group_size={group_size} "
                         f"elements, got shape {tuple(rewards.shape)}")
    r = rewards.to(acc_dtype(rewards.dtype)).view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=True, keepdim=True)
    return ((r - mean) / (std + eps)).view(-1)


def grpo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                     advantages: torch.Tensor, mask: torch.Tensor | None = None, *,
                     clip_eps: float = 0.2, kl_coef: float = 0.04,
                     num_tokens: Count | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + kl_coef·k3(π, π_ref) per token, token-mean over the global batch.

    advantages: [N] per token (broadcast each sequence's group-normalised reward with
    ``expand_to_tokens``). The KL sits in the loss, not the reward, and its gradient flows through
    ``logp``. Normalisation is the global token mean (DESIGN's loss contract), not DeepSeekMath's
    per-sequence mean then mean over sequences, which would weight short responses' tokens more.
    """
    per_token, clipped, log_ratio = clipped_surrogate(logp, old_logp, advantages, clip_eps, mask)
    kl = kl_k3(zero_masked(logp, mask), zero_masked(ref_logp.detach(), mask))
    loss = token_mean(per_token + kl_coef * kl, mask, num_tokens=num_tokens)
    dtype = per_token.dtype
    metrics = {
        "clip_frac": masked_mean(clipped.to(dtype), mask),
        "kl": masked_mean(kl.detach(), mask),
        "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
    }
    return loss, metrics
