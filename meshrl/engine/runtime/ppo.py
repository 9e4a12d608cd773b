"""PPO: actor, critic, reference and a reward (model or verifier), with the paper's factors —
large batches by accumulation, advantage normalisation over the global batch, value normalisation
and an optional EMA reference (ref ← α·ref + (1−α)·actor after every actor step).

Every call runs in its own layout; rollouts and inference results are gathered to every rank, so
rewards, GAE and normalisation are computed on the whole global batch, identically everywhere.
"""
from __future__ import annotations

import torch

from meshrl.engine.algorithms import losses as L
from meshrl.engine.algorithms.calls import ppo_actor_call, ppo_critic_call
from meshrl.engine.batch import split_even
from meshrl.engine.train import global_token_count
from meshrl.kernels import gae, masked_whiten

from .common import (epoch_order, evaluate_pass_rate, global_batch, held_out_prompts, run_loop,
                     train_prompts)
from .rollout import (dump, flatten, logprobs_job, microbatches, sample, sampling_params, score,
                      split_values, unflatten, values_job)

TRAIN_FIELDS = ("old_logp", "advantages", "returns", "old_values")


class PPO:
    def __init__(self, ctx):
        self.ctx, self.cfg, self.P = ctx, ctx.cfg, ctx.cfg.ppo
        self.prompts = train_prompts(ctx)
        P = self.P
        self.kl_ctl = (L.AdaptiveKLController(P.kl_coef, P.kl_target, P.kl_horizon) if P.adaptive_kl
                       else L.FixedKLController(P.kl_coef))
        self.moments = L.RunningMoments()
        if "kl_ctl" in ctx.host_state:
            self.kl_ctl.load_state_dict(ctx.host_state["kl_ctl"])
            self.moments.load_state_dict(ctx.host_state["moments"])

    def rollout(self, it: int):
        ctx, cfg = self.ctx, self.cfg
        batch = [self.prompts[i] for i in global_batch(len(self.prompts), self.P.batch_size, it, cfg.seed)]
        roll = sample(ctx, "actor_gen", batch, sampling_params(cfg.generation, ctx.eos_ids, cfg.seed, it))
        roll.scores = score(ctx, "actor_gen", roll)
        dump(ctx, it, roll)
        return roll

    def advantages(self, roll) -> dict:
        """Old log-probs (actor), reference log-probs, values; shaped rewards, GAE, normalisation."""
        ctx, P, T = self.ctx, self.P, self.cfg.generation.temperature
        # one gather for the three: on disjoint meshes they compute at the same time
        old, ref, vals = ctx.run_sharded_many([
            logprobs_job(ctx, "actor_train", roll, T, timer="actor_inf"),
            logprobs_job(ctx, "ref_inf", roll, T), values_job(ctx, "critic_inf", roll)])
        values, last_values = split_values(vals)
        lp, cu = flatten(old)
        rlp, _ = flatten(ref)
        v, _ = flatten(values)
        v_raw = self.moments.denormalize(v) if P.value_norm else v
        ended = roll.ended
        boot = torch.zeros(len(roll))
        if P.truncated == "bootstrap":
            last = self.moments.denormalize(last_values) if P.value_norm else last_values
            boot = torch.where(ended, boot, last)
        rewards = L.shape_rewards(roll.scores, lp, rlp, cu, kl_coef=self.kl_ctl.value,
                                  reward_clip=P.reward_clip, estimator=P.kl_estimator, ended=ended,
                                  truncated=P.truncated, truncation_penalty=P.truncation_penalty)
        dev = ctx.device
        adv, ret = gae(rewards.to(dev), v_raw.to(dev), cu.to(dev), bootstrap_values=boot.to(dev),
                       gamma=P.gamma, lam=P.lam)
        adv, ret = adv.cpu(), ret.cpu()
        raw_adv, raw_ret = adv.clone(), ret.clone()
        if P.value_norm:
            self.moments.update(ret)
            ret = self.moments.normalize(ret)
        if P.adv_norm:
            adv = masked_whiten(adv)
        roll.extra = {"old_logp": old, "advantages": unflatten(adv, cu), "returns": unflatten(ret, cu),
                      "old_values": values}
        gen_lp, _ = flatten(roll.gen_logprobs)
        n = float(len(roll))
        out = {"score": roll.scores.mean().item(),
               "kl_seq": L.segment_sum(L.kl_estimate(lp, rlp, "k1"), cu).sum().item() / n,
               "response_len": float(cu[-1]) / n, "truncated": (~ended).float().mean().item(),
               "reward_total": rewards.sum().item() / n,
               "gen_train_logp_gap": (gen_lp - lp).abs().mean().item(),
               "advantage_raw": raw_adv.mean().item(), "value": v_raw.mean().item(),
               "return": raw_ret.mean().item()}
        if ctx.verifier is not None:
            out["pass_rate"] = (roll.scores > 0.5).float().mean().item()
        return out

    def train(self, roll, it: int) -> dict:
        ctx, P, T = self.ctx, self.P, self.cfg.generation.temperature
        fields = {k: roll.extra[k] for k in TRAIN_FIELDS}

        def batches(call):
            return lambda local: microbatches(roll, local, ctx.max_tokens(call), fields, ctx.sp_pad(call))

        def loss_of(call, make):
            return lambda mbs: make(global_token_count(mbs, ctx.layout(call), "action_mask"))

        totals, n = {}, 0
        for epoch in range(P.epochs):
            for mb_idx in split_even(epoch_order(len(roll), self.cfg.seed + it, epoch), P.minibatches):
                with ctx.timed("actor_train"):
                    am = ctx.train_call("actor_train", mb_idx, batches("actor_train"), loss_of(
                        "actor_train", lambda t: ppo_actor_call(t, clip_eps=P.clip_eps, temperature=T,
                                                                entropy_coef=P.entropy_coef)))
                if P.ema_ref:
                    with ctx.timed("ema_ref"):
                        ctx.blend(ctx.calls["ref_inf"].model, ctx.calls["actor_train"].model,
                                  P.ema_alpha)
                with ctx.timed("critic_train"):
                    cm = ctx.train_call("critic_train", mb_idx, batches("critic_train"), loss_of(
                        "critic_train", lambda t: ppo_critic_call(t, value_clip=P.value_clip)))
                for k, v in [*(("actor/" + k, v) for k, v in am.items()),
                             *(("critic/" + k, v) for k, v in cm.items())]:
                    totals[k] = totals.get(k, 0.0) + v
                n += 1
        return {k: v / n for k, v in totals.items()}

    def step(self, it: int) -> dict:
        trained = [self.ctx.model(c) for c in ("actor_train", "critic_train")]
        for m in trained:
            m.offload()
        roll = self.rollout(it)
        metrics = self.advantages(roll)
        for m in trained:
            m.reload()
        metrics.update(self.train(roll, it))
        self.kl_ctl.update(metrics["kl_seq"], self.P.batch_size)
        metrics["kl_coef"] = self.kl_ctl.value
        self.ctx.host_state.update(kl_ctl=self.kl_ctl.state_dict(), moments=self.moments.state_dict())
        return metrics


def run(ctx) -> dict:
    ppo = PPO(ctx)
    return run_loop(ctx, ppo.P.iterations, ppo.step, desc="ppo", limit_key="ppo.iterations",
                    eval_fn=lambda step: evaluate_pass_rate(ctx, "actor_gen", step),
                    eval_data=lambda: held_out_prompts(ctx),
                    show=("score", "kl_seq", "actor/actor_loss"),
                    updates_per_step=ppo.P.epochs * ppo.P.minibatches)
