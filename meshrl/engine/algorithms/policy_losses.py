"""Policy losses of the PPO family and the ways a per-token loss becomes one number.

``policy_terms`` gives the per-token loss of one objective; the actor's call adds the terms that
ride with it (k3 KL when the KL is in the loss, the entropy bonus) and ``aggregate`` reduces the
sum. Every reduction divides by a *global* count of the optimizer step's batch (``LossCounts``:
all microbatches, data-parallel ranks and, on the last pipeline stage, the same numbers), and a
response never spans two microbatches, so any split of the batch gives the same gradient.

Objectives (ρ_t = π(a_t)/π_old(a_t), A_t the advantage):
- ``clip``: −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) (Schulman et al. 2017); ε_low = ε_high is
  PPO's, a larger ε_high is DAPO's clip-higher (Yu et al., arXiv 2503.14476).
- ``dual_clip``: ``clip``, and for A < 0 the loss is also capped at −c·A (Ye et al., arXiv
  1912.09729; verl's default, ``clip_ratio_c`` = 3): a ratio far above 1 on a bad action no longer
  gives an unbounded push.
- ``gspo``: the ratio of the whole response, length-normalised, s = exp(mean_t log ρ_t), clipped
  as in ``clip`` (Zheng et al., GSPO, arXiv 2507.18071); per token s·π_t/sg(π_t), so its gradient is
  s·∇log π_t (verl's GSPO-token form, the paper's gradient when A is constant over the response).

Aggregations (verl's names; L_t the per-token loss over counted actions, n_b response b's count):
- ``token-mean``: Σ_t L_t / N_tokens (every token weighs the same; DAPO's, TRL's default)
- ``seq-mean-token-sum``: Σ_b Σ_t L_t / N_seqs
- ``seq-mean-token-mean``: Σ_b (Σ_t L_t / n_b) / N_seqs (every response weighs the same; GRPO paper)
- ``seq-mean-token-sum-norm``: Σ_b Σ_t L_t / (N_seqs · L_norm), L_norm a constant such as the
  generation limit (Dr.GRPO: no length normalisation, so long wrong answers are not favoured)

Off-policy corrections (asynchronous RL: the batch was sampled by π_behav, an older policy than the
π_prox whose log-probs the actor recomputes before its update and divides by in ρ). Per counted
action the behaviour weight w_t = π_prox(a_t)/π_behav(a_t) (detached; a non-finite log-ratio counts
as 0, w = 1, as AReaL's does) multiplies the policy term only, not the KL or entropy terms, as both
peers do:
- ``decoupled``: actions with w above the cap are left out (weight 0) and the others' policy loss is
  scaled by w; the normaliser still counts the left-out actions (AReaL's decoupled PPO, Fu et al.,
  arXiv 2505.24298: ``ppo_actor_loss_fn`` with token-level rejection on the ratio, action "mask").
- ``tis``: w clamped at the cap from above (truncated importance sampling: Yao et al., "Your
  efficient RL framework secretly brings you off-policy RL training", 2025; verl's
  ``compute_rollout_correction_weights`` with rollout_is="token").
- ``none``: no weight (the on-policy loss).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from meshrl.engine.algorithms.reductions import (acc_dtype, expand_to_tokens, masked_mean,
                                                 masked_sum, segment_sum, zero_masked)

POLICY_LOSSES = ("clip", "dual_clip", "gspo")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# off-policy corrections of a batch sampled by an older policy (async.correction), and the default
# cap of each on the behaviour weight π_prox/π_behav
CORRECTIONS = ("decoupled", "tis", "none")
IMP_CAP = {"decoupled": 5.0, "tis": 2.0}
_GSPO_MAX_LOG_RATIO = 10.0  # exp(10) bounds a sequence ratio whose log-ratio drifted far


@dataclass(frozen=True)
class LossCounts:
    """The optimizer step's global normalisers: counted actions, responses with at least one
    counted action, and ``seq-mean-token-sum-norm``'s constant length."""
    tokens: float
    seqs: float
    norm_len: float = 1.0


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor, mode: str,
              counts: LossCounts) -> torch.Tensor:
    """This shard's share of the batch loss under ``mode`` (see the module docstring). ``mask``
    [N] marks counted actions; ``cu_seqlens`` [B+1] delimits the packed sequences (prompt and
    response: the per-response sums only see the masked actions)."""
    if mode == "token-mean":
        return masked_sum(per_token, mask) / counts.tokens
    if mode == "seq-mean-token-sum":
        return masked_sum(per_token, mask) / counts.seqs
    if mode == "seq-mean-token-sum-norm":
        return masked_sum(per_token, mask) / (counts.seqs * counts.norm_len)
    if mode == "seq-mean-token-mean":
        dtype = acc_dtype(per_token.dtype)
        sums = segment_sum(zero_masked(per_token.to(dtype), mask), cu_seqlens)
        n = segment_sum(mask.to(dtype), cu_seqlens)
        return (sums / n.clamp_min(1)).sum() / counts.seqs  # a response with no counted action: 0
    raise ValueError(f"loss aggregation must be one of {', '.join(AGGREGATIONS)}, got {mode!r}")


def _log_ratio(logp, old_logp, mask):
    dtype = acc_dtype(logp.dtype)
    return zero_masked(logp.to(dtype) - old_logp.detach().to(dtype), mask)


def _clipped(ratio, adv, eps_low, eps_high):
    """−min(ρA, clip(ρ)A), where the clip removed the gradient (the clipped branch is smaller),
    and where ρ is outside the clip range whatever the advantage's sign."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    out = ((ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high)).detach()
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).detach(), out


def policy_terms(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                 mask: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *, kind: str = "clip",
                 clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, clip_ratio_c: float = 3.0
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss [N] of objective ``kind`` and this shard's metrics: ``clip_frac`` (actions
    whose gradient the clip removed), ``ratio_out_frac`` (ratio outside the clip range, whatever
    the advantage), ``approx_kl`` (k3 of KL(π_old‖π) per action), ``ratio_mean``;
    ``dual_clip`` adds ``clip_frac_lower`` (negative-advantage actions capped at −c·A); ``gspo``
    reports its sequence ratio's mean as ``seq_ratio_mean``. Masked-out positions get ρ = 1 and
    A = 0 so nothing they hold reaches the gradient as NaN. ``cu_seqlens`` is needed by ``gspo``.
    """
    log_ratio = _log_ratio(logp, old_logp, mask)
    adv = zero_masked(advantages.detach().to(log_ratio.dtype), mask)
    metrics = {"approx_kl": masked_mean(torch.expm1(log_ratio.detach()) - log_ratio.detach(), mask),
               "ratio_mean": masked_mean(log_ratio.detach().exp(), mask)}
    if kind in ("clip", "dual_clip"):
        loss, clipped, out = _clipped(log_ratio.exp(), adv, clip_eps_low, clip_eps_high)
        if kind == "dual_clip":
            if clip_ratio_c <= 1.0:
                raise ValueError(f"clip_ratio_c must exceed 1 (the cap is c·|A|), got {clip_ratio_c}")
            cap = -adv * clip_ratio_c
            lower = ((adv < 0) & (loss > cap)).detach()
            loss = torch.where(adv < 0, torch.minimum(loss, cap), loss)
            metrics["clip_frac_lower"] = masked_mean(lower.to(loss.dtype), mask)
    elif kind == "gspo":
        if cu_seqlens is None:
            raise ValueError("gspo needs cu_seqlens (its ratio is per response)")
        m = mask.to(log_ratio.dtype)
        n = segment_sum(m, cu_seqlens).clamp_min(1)
        seq_log_ratio = (segment_sum(log_ratio, cu_seqlens) / n).detach()
        lp = zero_masked(logp.to(log_ratio.dtype), mask)
        token_seq = lp - lp.detach() + expand_to_tokens(seq_log_ratio, cu_seqlens, lp.numel())
        loss, clipped, out = _clipped(token_seq.clamp(max=_GSPO_MAX_LOG_RATIO).exp(), adv,
                                      clip_eps_low, clip_eps_high)
        metrics["seq_ratio_mean"] = masked_mean(expand_to_tokens(seq_log_ratio.exp(), cu_seqlens,
                                                                 lp.numel()), mask)
    else:
        raise ValueError(f"policy loss must be one of {', '.join(POLICY_LOSSES)}, got {kind!r}")
    metrics["clip_frac"] = masked_mean(clipped.to(loss.dtype), mask)
    metrics["ratio_out_frac"] = masked_mean(out.to(loss.dtype), mask)
    return loss, metrics


def behaviour_cap(correction: str, cap: float | None = None) -> float:
    """The cap on the behaviour weight under ``correction`` (``IMP_CAP``'s when ``cap`` is None;
    infinite for ``none``)."""
    if correction not in CORRECTIONS:
        raise ValueError(f"off-policy correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    if correction == "none":
        return math.inf
    cap = IMP_CAP[correction] if cap is None else float(cap)
    if not cap > 1.0:  # AReaL's check on its ratio bound: a cap at or below 1 cuts on-policy actions
        raise ValueError(f"imp_cap must exceed 1 (an on-policy action's weight), got {cap}")
    return cap


def behaviour_ratio(old_logp: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor
                    ) -> torch.Tensor:
    """The uncapped behaviour weight π_prox/π_behav [N], detached, in the accumulation dtype;
    0 where ``mask`` is unset (a prompt position's log-probs are not an action's)."""
    dtype = acc_dtype(old_logp.dtype)
    log_w = old_logp.detach().to(dtype) - behav_logp.detach().to(dtype)
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.zeros((), dtype=dtype, device=log_w.device))
    return zero_masked(zero_masked(log_w, mask).exp(), mask)  # inner: no exp of a prompt's garbage


def behaviour_terms(old_logp: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor,
                    correction: str, cap: float | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The uncapped ratio π_prox/π_behav [N] (`behaviour_ratio`), the weights [N] of the per-token
    policy loss under ``correction`` (module docstring) and the counted actions [N] whose ratio
    exceeded the cap (left out by ``decoupled``, clamped by ``tis``), from one ratio."""
    cap = behaviour_cap(correction, cap)
    ratio = behaviour_ratio(old_logp, behav_logp, mask)
    capped = (ratio > cap) & mask.bool()
    if correction == "decoupled":
        w = ratio.masked_fill(capped, 0.0)
    elif correction == "tis":
        w = ratio.clamp(max=cap)
    else:
        w = zero_masked(torch.ones_like(ratio), mask)
    return ratio, w, capped


def behaviour_weights(old_logp: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor,
                      correction: str, cap: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [N] of the per-token policy loss under ``correction`` (module docstring) and the
    counted actions [N] whose weight exceeded the cap (left out by ``decoupled``, clamped by
    ``tis``). ``old_logp`` is π_prox's, ``behav_logp`` the generation engine's; ``none`` weighs
    every counted action 1."""
    return behaviour_terms(old_logp, behav_logp, mask, correction, cap)[1:]


def behaviour_stats(old_logp: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor,
                    correction: str, cap: float | None = None) -> dict[str, float]:
    """The behaviour weight over a whole batch, on the host: ``imp_weight_mean`` and
    ``imp_weight_max`` (uncapped, over counted actions) and ``imp_capped_frac`` (counted actions
    capped or left out). The actor's call reports the mean and the fraction too, as shares that sum
    over microbatches and ranks; a max cannot be summed that way, so it comes from here."""
    mask = mask.bool()
    w, _, capped = behaviour_terms(old_logp, behav_logp, mask, correction, cap)
    if not bool(mask.any()):
        return {"imp_weight_mean": 0.0, "imp_weight_max": 0.0, "imp_capped_frac": 0.0}
    return {"imp_weight_mean": float(masked_mean(w, mask)), "imp_weight_max": float(w[mask].max()),
            "imp_capped_frac": float(masked_mean(capped.to(w.dtype), mask))}
