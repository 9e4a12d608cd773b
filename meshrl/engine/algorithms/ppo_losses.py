"""PPO's math: KL estimators, reward shaping, KL controllers, clipped policy/value losses, entropy.

GAE and advantage whitening are not here: they are kernels (``meshrl.kernels``).
"""
from __future__ import annotations

import torch

from meshrl.engine.algorithms.policy_losses import policy_terms
from meshrl.engine.algorithms.reductions import (Count, acc_dtype, check_nonempty,
                                                 last_token_index, masked_mean, token_mean,
                                                 zero_masked)

TRUNCATED_MODES = ("score", "bootstrap")


def _log_ratio(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    dtype = acc_dtype(logp.dtype)
    return logp.to(dtype) - ref_logp.to(dtype)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π − log π_ref per sampled token: unbiased for KL(π‖π_ref), can be negative."""
    return _log_ratio(logp, ref_logp)


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½(log π − log π_ref)²: non-negative, biased, low variance when π ≈ π_ref."""
    return 0.5 * _log_ratio(logp, ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(d) − d − 1 with d = log π_ref − log π: unbiased and non-negative (Schulman).

    expm1 rather than exp(d) − 1: near π = π_ref, d is tiny and exp(d) − 1 would cancel to noise.
    """
    d = -_log_ratio(logp, ref_logp)
    return torch.expm1(d) - d


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}")
    return KL_ESTIMATORS[estimator](logp, ref_logp)


@torch.no_grad()
def shape_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                  cu_seqlens: torch.Tensor, *, kl_coef: float | torch.Tensor,
                  reward_clip: float | None = 20.0, estimator: str = "k1",
                  ended: torch.Tensor | None = None, truncated: str = "score",
                  truncation_penalty: float = 0.0) -> torch.Tensor:
    """Per-token PPO rewards [N] over action tokens: −kl_coef·KL_t, plus the score at the end.

    score: [B] scalar scores (reward model or verifier); clipped to ±reward_clip (None: no clip).
    logp, ref_logp: [N] log-probs of the sampled actions under the policy and the reference.
    cu_seqlens: [B+1] over action tokens (EOS included), every sequence non-empty.
    ended: [B] bool, True where the response ended with EOS/stop (default: all ended).
    truncated: what a response that hit the length limit gets at its last action —
      "score": the clipped score, as if final (the default, as most peers do);
      "bootstrap": no score; the caller passes the critic's value of the next state to GAE.
    truncation_penalty: subtracted at a truncated response's last action, after clipping (so the
      clip cannot swallow it); positive values penalise, as TRL's ``missing_eos_penalty``.
    The result is data, not a graph: nothing here is differentiated.
    """
    if truncated not in TRUNCATED_MODES:
        raise ValueError(f"truncated must be one of {TRUNCATED_MODES}, got {truncated!r}")
    check_nonempty(cu_seqlens)
    rewards = -kl_coef * kl_estimate(logp, ref_logp, estimator)
    s = score.to(rewards.dtype)
    if reward_clip is not None:
        s = s.clamp(-reward_clip, reward_clip)
    if ended is not None:
        cut = ~ended.bool()
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        if truncated == "bootstrap":
            s = torch.where(cut, zero, s)
        s = s - truncation_penalty * cut.to(s.dtype)
    return rewards.index_add(0, last_token_index(cu_seqlens), s)


class FixedKLController:
    """A constant KL coefficient with the adaptive controller's interface."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019): steer the measured KL toward ``target`` over ``horizon`` samples.

    β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n_steps/horizon). The clip bounds each step's
    change, so one noisy KL reading cannot swing the coefficient. ``current_kl`` is the mean
    per-sequence KL of the *global* batch (all-reduce before calling); n_steps its sample count.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor | None = None, *, clip_eps: float = 0.2,
                    num_tokens: Count | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, token-mean over the global batch (``num_tokens``).

    logp: [N] current log-probs (with grad); old_logp: [N] log-probs of the policy that sampled
    (recomputed by the actor before the update); advantages: [N]; mask: [N] bool or None.
    Metrics over this shard: ``clip_frac`` (tokens whose gradient the clip removed),
    ``ratio_out_frac`` (|ρ − 1| > ε, regardless of the advantage's sign), ``approx_kl``
    (k3 estimate of KL(π_old‖π): exp(log ρ) − 1 − log ρ, averaged), ``ratio_mean``.
    The other objectives and aggregations: ``policy_losses``.
    """
    per_token, metrics = policy_terms(logp, old_logp, advantages, mask, kind="clip",
                                      clip_eps_low=clip_eps, clip_eps_high=clip_eps)
    return token_mean(per_token, mask, num_tokens=num_tokens), metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor | None = None, *, value_clip: float | None = 0.2,
                   num_tokens: Count | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ½·max((V − R)², (V_old + clip(V − V_old, ±c) − R)²), token-mean.

    The max (not min) makes it pessimistic: moving V more than c away from V_old earns no credit
    for getting closer to R. ``value_clip=None`` gives the plain ½(V − R)².
    Metrics: ``vf_clip_frac`` (tokens where the clipped error is the larger, so V gets no
    gradient), ``value_mean``, ``value_error`` (mean (V − R)²).
    """
    dtype = acc_dtype(values.dtype)
    v = zero_masked(values.to(dtype), mask)
    target = zero_masked(returns.detach().to(dtype), mask)
    err = (v - target) ** 2
    if value_clip is None:
        per_token, clipped = 0.5 * err, torch.zeros_like(err, dtype=torch.bool)
    else:
        old = zero_masked(old_values.detach().to(dtype), mask)
        err_clipped = (old + (v - old).clamp(-value_clip, value_clip) - target) ** 2
        per_token, clipped = 0.5 * torch.maximum(err, err_clipped), (err_clipped > err).detach()
    loss = token_mean(per_token, mask, num_tokens=num_tokens)
    metrics = {
        "vf_clip_frac": masked_mean(clipped.to(dtype), mask),
        "value_mean": masked_mean(v.detach(), mask),
        "value_error": masked_mean(err.detach(), mask),
    }
    return loss, metrics


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor | None = None, *, coef: float,
                  num_tokens: Count | None = None) -> torch.Tensor:
    """The term to *add* to the loss for an entropy bonus: −coef · token-mean entropy."""
    return -coef * token_mean(entropy, mask, num_tokens=num_tokens)
