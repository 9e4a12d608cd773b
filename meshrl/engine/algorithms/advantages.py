"""Advantage estimators of the critic-free family: pure functions on one outcome score per response.

Every estimator here has two halves. ``baseline_adjusted`` turns the scores [B] of a batch (``k``
consecutive samples per prompt) into per-response values; ``token_advantages`` spreads them over
the response's tokens: the adjusted score sits at the last action, an optional per-token reward
(−β·KL, when the KL is in the reward) at every action, and the advantage of action t is the
discounted return from t (γ = 1 by default, so with no per-token reward every action of a response
gets its adjusted score). REINFORCE++ and its baseline variant then whiten the advantages over the
whole batch's actions (masked, biased variance, as PPO's advantage normalisation).

GAE (with a critic) is a kernel (``meshrl.kernels.gae``); the discounted return here is that kernel
with zero values and λ = 1.

Estimators, with their sources:
- ``grpo``: (r − mean_g)/(std_g + ε), the group's sample (n − 1) std (DeepSeekMath, arXiv 2402.03300).
- ``dr_grpo``: r − mean_g, no std and (with the loss's ``seq-mean-token-sum-norm``) no length
  normalisation (Liu et al., "Understanding R1-Zero-Like Training", arXiv 2503.20783).
- ``rloo``: r − mean of the *other* k − 1 samples = k/(k − 1)·(r − mean_g) (Ahmadian et al.,
  arXiv 2402.14740; Kool et al. 2019).
- ``reinforce_pp``: no baseline; returns whitened over the global batch (Hu, REINFORCE++, arXiv
  2501.03262), with the KL per token in the reward.
- ``reinforce_pp_baseline``: r − mean_g, then the same global whitening (REINFORCE++-baseline).
- ``remax``: r − r(greedy response to the same prompt) (Li et al., ReMax, arXiv 2310.10505).
"""
from __future__ import annotations

import torch

from meshrl.engine.algorithms.reductions import acc_dtype, last_token_index
from meshrl.kernels import gae, masked_whiten

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax")
# estimators whose baseline is the prompt's group: each prompt needs k >= 2 samples
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
WHITENED = ("reinforce_pp", "reinforce_pp_baseline")


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores must be 1D with a multiple of group_size={group_size} elements, "
                         f"got shape {tuple(scores.shape)}")
    return scores.to(acc_dtype(scores.dtype)).view(-1, group_size)


def group_normalize(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r − group mean) / (group std + eps) over consecutive groups of ``group_size``.

    The std is the *sample* (n − 1) std, as DeepSeekMath's GRPO and TRL's ``GRPOTrainer`` compute
    it; so a group of rewards {0, 1} maps to ±1/√2, not ±1. A group whose samples all score the
    same gets advantage 0 (its std is 0, the numerator is 0).
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a sample std, got {group_size}")
    r = _groups(scores, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=True, keepdim=True) + eps)).view(-1)


def group_center(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr.GRPO and REINFORCE++-baseline: r − group mean (no division by the group's spread, which
    up-weights prompts that are almost always or almost never solved)."""
    r = _groups(scores, group_size)
    return (r - r.mean(1, keepdim=True)).view(-1)


def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: r_i − (Σ_j r_j − r_i)/(k − 1), the mean of the group's other samples as baseline, so
    the baseline does not depend on the sample it judges (an unbiased estimate)."""
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (a baseline from the others), got {group_size}")
    r = _groups(scores, group_size)
    return (r - (r.sum(1, keepdim=True) - r) / (group_size - 1)).view(-1)


def baseline_adjusted(scores: torch.Tensor, estimator: str, group_size: int, *,
                      greedy_scores: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Per-response values [B] (fp32) that ``token_advantages`` spreads over the actions.

    scores: [B], the ``group_size`` samples of each prompt consecutive. greedy_scores: [B / k]
    (``remax`` only), the score of each prompt's greedy response.
    """
    if estimator == "grpo":
        return group_normalize(scores, group_size, eps)
    if estimator in ("dr_grpo", "reinforce_pp_baseline"):
        return group_center(scores, group_size)
    if estimator == "rloo":
        return leave_one_out(scores, group_size)
    if estimator == "reinforce_pp":
        return scores.to(acc_dtype(scores.dtype))
    if estimator == "remax":
        if greedy_scores is None:
            raise ValueError("remax needs greedy_scores: the score of each prompt's greedy response")
        r = _groups(scores, group_size)
        return (r - greedy_scores.to(r.dtype)[:, None]).view(-1)
    raise ValueError(f"advantage estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")


def token_advantages(seq_values: torch.Tensor, cu_seqlens: torch.Tensor, *,
                     token_rewards: torch.Tensor | None = None, gamma: float = 1.0,
                     whiten: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Advantages [N] over packed actions: the discounted return from each action of the rewards
    ``token_rewards`` (e.g. −β·KL_t; default 0) plus ``seq_values[b]`` at response b's last action;
    with ``whiten``, (A − mean)/std over the actions in ``mask`` (all by default), biased variance.

    cu_seqlens: [B+1] over action tokens, every response non-empty.
    """
    n = int(cu_seqlens[-1])
    rewards = torch.zeros(n, dtype=torch.float32) if token_rewards is None else token_rewards.float().clone()
    rewards = rewards.index_add(0, last_token_index(cu_seqlens), seq_values.float())
    adv, _ = gae(rewards, torch.zeros_like(rewards), cu_seqlens, gamma=gamma, lam=1.0)
    return masked_whiten(adv, mask) if whiten else adv
