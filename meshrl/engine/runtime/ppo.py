"""PPO: actor, critic, reference and a reward (model or verifier), with the paper's factors —
large batches by accumulation, global advantage normalisation, value normalisation and an optional
EMA reference (ref ← α·ref + (1−α)·actor after every actor step)."""
from __future__ import annotations

import torch

from meshrl.engine.algorithms import losses as L
from meshrl.engine.algorithms.calls import ppo_actor_call, ppo_critic_call
from meshrl.engine.batch import split_even
from meshrl.engine.data.datasets import load_prompts
from meshrl.engine.train import global_token_count
from meshrl.kernels import gae, masked_whiten

from .common import epoch_order, evaluate_pass_rate, global_batch, global_means, run_loop
from .rollout import (flatten, logprobs_of, microbatches, reward_model_scores, sample,
                      sampling_params, score_with_verifier, unflatten, values_of)


class PPO:
    def __init__(self, ctx):
        self.ctx, self.cfg, self.P = ctx, ctx.cfg, ctx.cfg.ppo
        d = self.cfg.data
        self.prompts = load_prompts(d.train, ctx.tokenizer, max_prompt_len=d.max_prompt_len,
                                    chat_template=d.chat_template)
        self.actor, self.critic = ctx.model("actor_train"), ctx.model("critic_train")
        self.ref = ctx.model("ref_inf")
        P = self.P
        self.kl_ctl = (L.AdaptiveKLController(P.kl_coef, P.kl_target, P.kl_horizon) if P.adaptive_kl
                       else L.FixedKLController(P.kl_coef))
        self.moments = L.RunningMoments()
        if "kl_ctl" in ctx.host_state:
            self.kl_ctl.load_state_dict(ctx.host_state["kl_ctl"])
            self.moments.load_state_dict(ctx.host_state["moments"])

    # ---- one iteration --------------------------------------------------------------------------
    def rollout(self, it: int):
        ctx, cfg = self.ctx, self.cfg
        batch = global_batch(len(self.prompts), self.P.batch_size, it, cfg.seed)
        local, first = ctx.dp_share([self.prompts[i] for i in batch], "actor_gen")
        params = sampling_params(cfg.generation, ctx.eos_ids, cfg.seed, it)
        with ctx.timed("actor_gen"):
            roll = sample(self.actor.stage, [p.prompt_ids for p in local], [p.record for p in local],
                          first, params, batch_size=cfg.generation.batch_size, device=ctx.device)
        with ctx.timed("rew_inf"):
            if ctx.verifier is not None:
                roll.scores = score_with_verifier(roll, ctx.verifier, ctx.tokenizer,
                                                  ctx.layout("actor_gen"))
            else:
                roll.scores = reward_model_scores(ctx.model("rew_inf").stage, roll,
                                                  ctx.max_tokens("rew_inf"), ctx.sp_pad("rew_inf"))
        return roll

    def advantages(self, roll):
        """Old log-probs (actor), reference log-probs, values; shaped rewards, GAE, normalisation."""
        ctx, P, T = self.ctx, self.P, self.cfg.generation.temperature
        dp_group = ctx.layout("actor_train").dp_group
        with ctx.timed("actor_inf"):
            old = logprobs_of(self.actor.stage, roll, T, ctx.max_tokens("actor_train"),
                              ctx.sp_pad("actor_train"))
        with ctx.timed("ref_inf"):
            ref = logprobs_of(self.ref.stage, roll, T, ctx.max_tokens("ref_inf"), ctx.sp_pad("ref_inf"))
        with ctx.timed("critic_inf"):
            values, last_values = values_of(self.critic.stage, roll, ctx.max_tokens("critic_inf"),
                                            ctx.sp_pad("critic_inf"))
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
        raw_adv = adv.clone()
        if P.value_norm:
            self.moments.update(ret, group=dp_group)
            ret = self.moments.normalize(ret)
        if P.adv_norm:
            adv = masked_whiten(adv.to(dev), group=dp_group).cpu()
        gen_lp, _ = flatten(roll.gen_logprobs)
        kl_seq = L.segment_sum(L.kl_estimate(lp, rlp, "k1"), cu)
        roll.extra = {"old_logp": old, "advantages": unflatten(adv, cu), "returns": unflatten(ret, cu),
                      "old_values": values}
        stats = {"score": roll.scores, "kl_seq": kl_seq, "response_len": (cu[1:] - cu[:-1]).float(),
                 "truncated": (~ended).float(), "reward_total": L.segment_sum(rewards, cu)}
        tok = {"gen_train_logp_gap": (gen_lp - lp).abs(), "advantage_raw": raw_adv,
               "value": v_raw, "return": self.moments.denormalize(ret) if P.value_norm else ret}
        sums = {k: (float(x.sum()), float(x.numel())) for k, x in {**stats, **tok}.items()}
        if ctx.verifier is not None:
            sums["pass_rate"] = (float((roll.scores > 0.5).sum()), float(len(roll)))
        return global_means(sums, dp_group, dev)

    def train(self, roll, it: int) -> dict:
        ctx, P = self.ctx, self.P
        layout = ctx.layout("actor_train")
        fields = {k: roll.extra[k] for k in ("old_logp", "advantages", "returns", "old_values")}
        totals: dict[str, float] = {}
        n_updates = 0
        for epoch in range(P.epochs):
            order = epoch_order(len(roll), self.cfg.seed + it, epoch)
            for mb_idx in split_even(order, P.minibatches):
                mbs = microbatches(roll, mb_idx, ctx.max_tokens("actor_train"), fields,
                                   ctx.sp_pad("actor_train"))
                n_tok = global_token_count(mbs, layout, "action_mask")
                with ctx.timed("actor_train"):
                    am = self.actor.trainer.step(mbs, ppo_actor_call(n_tok, clip_eps=P.clip_eps,
                                                                     entropy_coef=P.entropy_coef))
                if P.ema_ref:
                    with ctx.timed("ema_ref"):
                        L.ema_update_(list(self.ref.stage.parameters()),
                                      list(self.actor.stage.parameters()), P.ema_alpha)
                cmbs = microbatches(roll, mb_idx, ctx.max_tokens("critic_train"), fields,
                                    ctx.sp_pad("critic_train"))
                with ctx.timed("critic_train"):
                    cm = self.critic.trainer.step(cmbs, ppo_critic_call(
                        global_token_count(cmbs, ctx.layout("critic_train"), "action_mask"),
                        value_clip=P.value_clip))
                for k, v in {**{f"actor/{k}": v for k, v in am.items()},
                             **{f"critic/{k}": v for k, v in cm.items()}}.items():
                    totals[k] = totals.get(k, 0.0) + v
                n_updates += 1
        return {k: v / n_updates for k, v in totals.items()}

    def step(self, it: int) -> dict:
        ctx = self.ctx
        for m in (self.actor, self.critic):
            m.offload()
        roll = self.rollout(it)
        metrics = self.advantages(roll)
        for m in (self.actor, self.critic):
            m.reload()
        metrics.update(self.train(roll, it))
        self.kl_ctl.update(metrics["kl_seq"], self.P.batch_size)
        metrics["kl_coef"] = self.kl_ctl.value
        ctx.host_state.update(kl_ctl=self.kl_ctl.state_dict(), moments=self.moments.state_dict())
        return metrics


def run(ctx) -> dict:
    ppo = PPO(ctx)
    return run_loop(ctx, ppo.P.iterations, ppo.step, desc="ppo",
                    eval_fn=lambda step: evaluate_pass_rate(ctx, "actor_gen", step),
                    show=("score", "kl_seq", "actor/actor_loss"),
                    updates_per_step=ppo.P.epochs * ppo.P.minibatches)
