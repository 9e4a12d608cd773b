"""Losses and RL math for SFT, reward models, DPO, PPO and GRPO: pure functions on tensors.
(The critic-free estimators are in ``advantages``, the policy objectives and aggregations in
``policy_losses``.)

This module holds SFT and the Bradley–Terry reward-model loss and re-exports the rest, so callers
import every loss from one place. Conventions shared by all of them:

- Token tensors are packed 1D (no padding); per-sequence reductions go through ``cu_seqlens``.
- Every token-mean loss takes ``num_tokens``: the token count of the *global* batch. The loss is
  ``sum over this shard / num_tokens``; summing shards then equals the whole-batch loss, so any
  microbatch or data-parallel split gives the same gradient. The default (the local count) is right
  only when there is a single shard. Pair losses take ``num_pairs`` in the same way.
- Training losses return ``(loss, metrics)``; metrics are detached tensors (no host sync) averaged
  over this shard only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from meshrl.engine.algorithms.dpo_losses import dpo_loss
from meshrl.engine.algorithms.advantages import group_normalize
from meshrl.engine.algorithms.grpo_losses import grpo_policy_loss
from meshrl.engine.algorithms.ppo_losses import (AdaptiveKLController, FixedKLController,
                                                 entropy_bonus, kl_estimate, kl_k1, kl_k2, kl_k3,
                                                 ppo_policy_loss, ppo_value_loss, shape_rewards)
from meshrl.engine.algorithms.reductions import (Count, acc_dtype, expand_to_tokens,
                                                 last_token_index, masked_sum, segment_sum, seq_ids,
                                                 token_mean)
from meshrl.engine.algorithms.rl_stats import RunningMoments, ema_update_

__all__ = [
    "AdaptiveKLController", "FixedKLController", "RunningMoments", "bradley_terry_loss",
    "dpo_loss", "ema_update_", "entropy_bonus", "expand_to_tokens", "group_normalize",
    "grpo_policy_loss", "kl_estimate", "kl_k1", "kl_k2", "kl_k3", "last_token_index", "masked_sum",
    "ppo_policy_loss", "ppo_value_loss", "reward_accuracy", "segment_sum", "seq_ids",
    "sequence_logps", "sft_loss", "shape_rewards", "token_mean",
]


def sft_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor | None = None, *,
             num_tokens: Count | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean negative log-likelihood over the tokens in ``loss_mask`` (response tokens).

    logprobs: [N] per-token log-probs of the labels (``token_logprobs``' output).
    loss_mask: [N] bool, which tokens count (None: all).
    num_tokens: global number of counted tokens (default: ``loss_mask.sum()``).
    """
    loss = token_mean(-logprobs, loss_mask, num_tokens=num_tokens)
    return loss, {"nll_sum": masked_sum(-logprobs.detach(), loss_mask)}


def sequence_logps(token_logps: torch.Tensor, cu_seqlens: torch.Tensor,
                   loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence log-prob [B]: the sum of the masked token log-probs (DPO's input)."""
    if loss_mask is not None:
        token_logps = torch.where(loss_mask.bool(), token_logps, torch.zeros_like(token_logps))
    return segment_sum(token_logps, cu_seqlens)


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ranked right; a tie counts as wrong (the model did not prefer y_w)."""
    return (chosen_rewards > rejected_rewards).float().mean()


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                       num_pairs: Count | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley–Terry reward-model loss ``-log σ(r_w − r_l)``, summed and divided by ``num_pairs``.

    chosen_rewards, rejected_rewards: [P] scalar scores of y_w and y_l (the last token's score).
    num_pairs: global pair count (default: P, i.e. the mean over these pairs).
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen {tuple(chosen_rewards.shape)} and rejected "
                         f"{tuple(rejected_rewards.shape)} rewards differ in shape")
    dtype = acc_dtype(chosen_rewards.dtype)
    margin = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)
    # logsigmoid, not log(sigmoid(.)): a margin of -100 would give log(0) = -inf.
    loss = token_mean(-F.logsigmoid(margin), num_tokens=num_pairs)
    metrics = {
        "accuracy": reward_accuracy(chosen_rewards.detach(), rejected_rewards.detach()),
        "margin": margin.detach().mean(),
        "chosen_reward": chosen_rewards.detach().to(dtype).mean(),
        "rejected_reward": rejected_rewards.detach().to(dtype).mean(),
    }
    return loss, metrics
