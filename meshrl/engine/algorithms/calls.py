"""Per-call interfaces: what each model function call computes on the last pipeline stage.

Training calls return ``fn(stage, hidden, mb) -> (loss, metrics)`` for ``engine.train.Trainer``;
inference calls return ``fn(stage, hidden, mb) -> tensor``. Losses take the *global* count of
tokens (or pairs) of the optimizer step, and every metric is returned as this microbatch's share of
a global mean (local mean × local count / global count), so summing over microbatches and
data-parallel ranks gives the global mean.

Token fields live at *label positions*: position t scores token t+1, so a response token's
log-prob, value, advantage and mask sit at the position before it (see ``engine.batch``).
"""
from __future__ import annotations

import torch

from meshrl.engine.algorithms import losses as L
from meshrl.engine.algorithms.policy_losses import (LossCounts, aggregate, behaviour_cap, behaviour_terms,
                                                    policy_terms)
from meshrl.engine.algorithms.reductions import masked_mean, zero_masked


def _share(metrics: dict, local: torch.Tensor | float, total: float) -> dict:
    w = float(local) / max(total, 1e-12)
    return {k: v.detach().float() * w for k, v in metrics.items()}


# ---- inference --------------------------------------------------------------------------------
def logprobs_call(temperature: float = 1.0, entropy: bool = False):
    """Log-probs [N] of each position's label (and entropies) under ``log_softmax(logits / T)``."""
    def fn(stage, hidden, mb):
        out = stage.token_logprobs(hidden, mb.tokens["labels"], temperature=temperature,
                                   return_entropy=entropy)
        return torch.stack(out) if entropy else out
    return fn


def values_call():
    """Critic values [N]: position t holds V(state before the token at t+1)."""
    return lambda stage, hidden, mb: stage.values(hidden)


def scores_call():
    """Reward-model scores [B]: the value head at each sequence's last token."""
    return lambda stage, hidden, mb: stage.values(hidden)[mb.last_index()]


# ---- SFT and reward model ---------------------------------------------------------------------
def sft_call(num_tokens: float):
    def fn(stage, hidden, mb):
        mask = mb.tokens["loss_mask"]
        logp = stage.token_logprobs(hidden, mb.tokens["labels"])
        loss, m = L.sft_loss(logp, mask.bool(), num_tokens=num_tokens)
        return loss, {"loss": loss.detach(), "tokens": mask.sum()}
    return fn


def _pair_scores(values, mb):
    """Pairs are packed chosen, rejected, chosen, rejected, …"""
    s = values[mb.last_index()][mb.seqs["real"].bool()]
    return s[0::2], s[1::2]


def reward_model_call(num_pairs: float):
    """Bradley–Terry on the last-token scores of (chosen, rejected) pairs."""
    def fn(stage, hidden, mb):
        chosen, rejected = _pair_scores(stage.values(hidden), mb)
        loss, _ = L.bradley_terry_loss(chosen, rejected, num_pairs=num_pairs)
        n = chosen.numel()
        m = {"accuracy": L.reward_accuracy(chosen, rejected), "margin": (chosen - rejected).mean(),
             "chosen_score": chosen.mean(), "rejected_score": rejected.mean()}
        return loss, {"loss": loss.detach(), **_share(m, n, num_pairs)}
    return fn


# ---- DPO ----------------------------------------------------------------------------------------
def _pair_logps(token_logps, mb, length_normalize: bool = False):
    mask = mb.tokens["loss_mask"].bool()
    seq = L.sequence_logps(token_logps, mb.meta.cu_seqlens, mask)
    if length_normalize:
        seq = seq / L.segment_sum(mask.float(), mb.meta.cu_seqlens).clamp_min(1)
    seq = seq[mb.seqs["real"].bool()]
    return seq[0::2], seq[1::2]


def dpo_call(num_pairs: float, num_chosen_tokens: float, *, beta: float, loss_type: str,
             label_smoothing: float, sft_coef: float, length_normalize: bool = False):
    """DPO family on (chosen, rejected) pairs; reference log-probs ride in ``mb.tokens['ref_logp']``.
    ``length_normalize``: each response's log-prob is its mean per token instead of its sum."""
    def fn(stage, hidden, mb):
        logp = stage.token_logprobs(hidden, mb.tokens["labels"])
        pc, pr = _pair_logps(logp, mb, length_normalize)
        rc, rr = _pair_logps(mb.tokens["ref_logp"], mb, length_normalize)
        nll = None
        if sft_coef:
            chosen_mask = mb.tokens["loss_mask"] * mb.tokens["is_chosen"]
            nll, _ = L.sft_loss(logp, chosen_mask.bool(), num_tokens=num_chosen_tokens)
        loss, m = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                             label_smoothing=label_smoothing, sft_coef=sft_coef, chosen_nll=nll,
                             num_pairs=num_pairs)
        return loss, {"loss": loss.detach(), **_share(m, pc.numel(), num_pairs)}
    return fn


# ---- PPO and the critic-free family -------------------------------------------------------------
def policy_call(counts: LossCounts, *, kind: str = "clip", agg: str = "token-mean", temperature: float,
                clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, clip_ratio_c: float = 3.0,
                entropy_coef: float = 0.0, kl_coef: float = 0.0, kl_estimator: str = "k3",
                correction: str = "none", imp_cap: float | None = None):
    """The actor's update: objective ``kind`` on the old log-probs and advantages in the batch,
    plus kl_coef·KL(π‖π_ref) per token when the KL is in the loss (``mb.tokens['ref_logp']``) and
    the entropy bonus, reduced by ``agg`` over the step's global ``counts``. Current log-probs and
    entropies are taken at the sampling ``temperature``, as the old and reference ones are: on
    policy, ρ = 1. Off policy, ``correction`` weighs the policy term by π_prox/π_behav (π_prox: the
    old log-probs, recomputed before the update), the
    generation engine's log-probs in ``mb.tokens['behav_logp']`` (``policy_losses``), and reports
    ``imp_weight_mean`` and ``imp_capped_frac``; ``policy_losses.behaviour_stats`` gives the max."""
    behaviour_cap(correction, imp_cap)  # a bad choice fails here, not in the first microbatch

    def fn(stage, hidden, mb):
        mask = mb.tokens["action_mask"].bool()
        cu = mb.meta.cu_seqlens
        out = stage.token_logprobs(hidden, mb.tokens["labels"], temperature=temperature,
                                   return_entropy=entropy_coef > 0)
        logp, ent = out if entropy_coef > 0 else (out, None)
        per_token, m = policy_terms(logp, mb.tokens["old_logp"], mb.tokens["advantages"], mask, cu,
                                    kind=kind, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
                                    clip_ratio_c=clip_ratio_c)
        if correction != "none":  # the policy term only, as AReaL and verl weigh it
            old, behav = mb.tokens["old_logp"], mb.tokens["behav_logp"]
            ratio, w, capped = behaviour_terms(old, behav, mask, correction, imp_cap)
            per_token = per_token * w.to(per_token.dtype)
            m["imp_weight_mean"] = masked_mean(ratio, mask)
            m["imp_capped_frac"] = masked_mean(capped.to(w.dtype), mask)
        if kl_coef:
            kl = L.kl_estimate(zero_masked(logp, mask), zero_masked(mb.tokens["ref_logp"], mask),
                               kl_estimator)
            per_token = per_token + kl_coef * kl
            m["kl"] = masked_mean(kl.detach(), mask)
        if ent is not None:
            per_token = per_token - entropy_coef * ent.to(per_token.dtype)
            m["entropy"] = masked_mean(ent.detach(), mask)
        loss = aggregate(per_token, mask, cu, agg, counts)
        return loss, {"actor_loss": loss.detach(), **_share(m, mask.sum(), counts.tokens)}
    return fn


def ppo_critic_call(num_tokens: float, *, value_clip: float | None):
    def fn(stage, hidden, mb):
        mask = mb.tokens["action_mask"].bool()
        loss, m = L.ppo_value_loss(stage.values(hidden), mb.tokens["old_values"],
                                   mb.tokens["returns"], mask, value_clip=value_clip,
                                   num_tokens=num_tokens)
        return loss, {"critic_loss": loss.detach(), **_share(m, mask.sum(), num_tokens)}
    return fn
