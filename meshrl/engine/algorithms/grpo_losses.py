"""GRPO's loss: the clipped surrogate with group-normalised advantages (no critic) and k3 KL to the
reference inside the loss. The estimators are in ``advantages``, the objectives in
``policy_losses``; this is their GRPO composition, token-mean."""
from __future__ import annotations

import torch

from meshrl.engine.algorithms.policy_losses import policy_terms
from meshrl.engine.algorithms.ppo_losses import kl_k3
from meshrl.engine.algorithms.reductions import Count, masked_mean, token_mean, zero_masked


def grpo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                     advantages: torch.Tensor, mask: torch.Tensor | None = None, *,
                     clip_eps: float = 0.2, kl_coef: float = 0.04,
                     num_tokens: Count | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + kl_coef·k3(π, π_ref) per token, token-mean over the global batch.

    advantages: [N] per token (broadcast each sequence's group-normalised reward with
    ``expand_to_tokens``). The KL sits in the loss, not the reward, and its gradient flows through
    ``logp``. Normalisation is the global token mean (the loss-normalisation contract), not DeepSeekMath's
    per-sequence mean then mean over sequences, which would weight short responses' tokens more
    (that is the ``seq-mean-token-mean`` aggregation of ``policy_losses``).
    """
    per_token, metrics = policy_terms(logp, old_logp, advantages, mask, kind="clip",
                                      clip_eps_low=clip_eps, clip_eps_high=clip_eps)
    kl = kl_k3(zero_masked(logp, mask), zero_masked(ref_logp.detach(), mask))
    loss = token_mean(per_token + kl_coef * kl, mask, num_tokens=num_tokens)
    return loss, {"clip_frac": metrics["clip_frac"], "kl": masked_mean(kl.detach(), mask),
                  "approx_kl": metrics["approx_kl"]}
