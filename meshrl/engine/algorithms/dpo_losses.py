"""The DPO family on sequence log-probs: DPO (sigmoid, with label smoothing), IPO and DPO+SFT."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from meshrl.engine.algorithms.reductions import Count, acc_dtype, token_mean

LOSS_TYPES = ("sigmoid", "ipo")


def _pair_losses(h: torch.Tensor, beta: float, label_smoothing: float,
                 loss_type: str) -> torch.Tensor:
    if loss_type == "sigmoid":
        # Label smoothing: the pair's label is flipped with probability ε — the conservative DPO
        # formula (cDPO, Mitchell 2023), as OpenRLHF's DPOLoss computes it (TRL's sigmoid loss does
        # not use its label_smoothing). ε = 0 is plain DPO. logsigmoid keeps a margin of ±100 finite.
        return (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)
                - label_smoothing * F.logsigmoid(-beta * h))
    # IPO regresses the log-ratio margin onto 1/(2β) instead of pushing it to infinity, so it
    # stays bounded when the pairs are deterministic.
    return (h - 1.0 / (2.0 * beta)) ** 2


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
             beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
             sft_coef: float = 0.0, chosen_nll: torch.Tensor | None = None,
             num_pairs: Count | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss on [P] sequence log-probs of the chosen (y_w) and rejected (y_l) responses.

    With h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)):
      sigmoid: −(1−ε)·log σ(β·h) − ε·log σ(−β·h)   (= log 2 at h = 0)
      ipo:     (h − 1/(2β))²
    The sequence log-probs are sums over the response's tokens, or their means (length-normalised)
    when the caller passes those: ``dpo.length_normalize`` chooses, by default sums for sigmoid (DPO's
    definition; OpenRLHF) and means for ipo (TRL's IPO, which keeps 1/(2β) on a per-token scale).
    Per-pair losses are summed and divided by ``num_pairs`` (global pair count; default P).

    DPO+SFT: ``sft_coef * chosen_nll`` is added. ``chosen_nll`` is either an already-normalised
    scalar (e.g. ``sft_loss`` on the chosen tokens with the global token count) or a per-pair [P]
    NLL, which is then reduced like the pair losses.

    Metrics: implicit rewards β·(log π − log π_ref) of chosen/rejected, their margin, and accuracy
    (chosen reward > rejected reward), averaged over these pairs.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid loss only, not to ipo")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if sft_coef and chosen_nll is None:
        raise ValueError("sft_coef > 0 needs chosen_nll (the NLL of the chosen responses)")
    dtype = acc_dtype(policy_chosen_logps.dtype)
    chosen_ratio = policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype)
    rejected_ratio = policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype)
    h = chosen_ratio - rejected_ratio
    pref_loss = token_mean(_pair_losses(h, beta, label_smoothing, loss_type), num_tokens=num_pairs)
    loss = pref_loss
    if sft_coef:
        nll = chosen_nll if chosen_nll.dim() == 0 else token_mean(chosen_nll, num_tokens=num_pairs)
        loss = loss + sft_coef * nll
    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    metrics = {
        "pref_loss": pref_loss.detach(),
        "rewards_chosen": chosen_rewards.mean(),
        "rewards_rejected": rejected_rewards.mean(),
        "rewards_margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards_accuracy": (chosen_rewards > rejected_rewards).to(dtype).mean(),
    }
    return loss, metrics
