"""PPO and the critic-free family in one loop: sample, score, the inference calls, advantages,
then epochs × shuffled minibatches of updates.

``algorithm: ppo`` trains a critic and takes GAE advantages from it, with the paper's factors —
large batches by accumulation, advantage normalisation over the global batch, value normalisation
and an optional EMA reference (ref ← α·ref + (1−α)·actor after every actor step) — and the KL to
the reference in the reward. ``algorithm: grpo`` is the critic-free family: k samples per prompt
and an outcome estimator (``grpo.advantage``: GRPO, Dr.GRPO, RLOO, REINFORCE++(-baseline), ReMax),
the KL in the loss (GRPO) or in the reward (REINFORCE++, RLOO). Both take any policy loss (clip,
dual-clip, clip-higher, GSPO) and loss aggregation, and DAPO's length handling (overlong filter,
soft overlong punishment); the critic-free family also DAPO's dynamic sampling.

Every call runs in its own layout; rollouts and inference results are gathered to every rank, so
rewards, advantages and normalisation are computed on the whole global batch, identically everywhere.
"""
from __future__ import annotations

import torch

from meshrl.engine.algorithms import advantages as A
from meshrl.engine.algorithms import losses as L
from meshrl.engine.algorithms.calls import policy_call, ppo_critic_call
from meshrl.engine.algorithms.policy_losses import LossCounts, behaviour_stats
from meshrl.engine.batch import split_even
from meshrl.engine.dataflow import ACTOR_GEN, ACTOR_TRAIN, CRITIC_TRAIN, REF_INF, UPDATE
from meshrl.engine.data.datasets import PromptExample
from meshrl.engine.train import global_seq_count, global_token_count
from meshrl.kernels import gae, masked_whiten

from .asynchronous import correction, sampled_ahead
from .loop import (epoch_order, evaluate_pass_rate, global_batch, held_out_prompts, run_loop,
                   train_prompts)
from .context import TrainJob
from .rollout import (Rollout, dump, flatten, logprobs_job, microbatches, sample, sample_job,
                      sampling_params, score, split_values, unflatten, values_job)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment [B]: 0 up to max_new_tokens − buffer tokens, then falling
    linearly to −penalty at max_new_tokens (Yu et al., arXiv 2503.14476, eq. 13)."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    over = (lengths.float() - (max_new_tokens - buffer)).clamp(min=0)
    return -penalty * over / buffer


class PromptStream:
    """Prompts in per-epoch shuffles, drawn from a position kept in the checkpoint: dynamic
    sampling takes as many as each step needs, and a resumed run continues where it stopped."""

    def __init__(self, n: int, seed: int, state: dict):
        self.n, self.seed, self.state = n, seed, state
        self.state.setdefault("prompt_position", 0)
        self._orders: dict[int, list[int]] = {}

    def take(self, count: int) -> list[int]:
        pos = self.state["prompt_position"]
        out = []
        for p in range(pos, pos + count):
            epoch = p // self.n
            if epoch not in self._orders:
                self._orders = {epoch: epoch_order(self.n, self.seed, epoch)}
            out.append(self._orders[epoch][p % self.n])
        self.state["prompt_position"] = pos + count
        return out


class PolicyGradient:
    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.critic = ctx.cfg.algorithm == "ppo"
        self.S = S = ctx.cfg.ppo if self.critic else ctx.cfg.grpo
        self.k = 1 if self.critic else S.group_size
        self.prompts = train_prompts(ctx)
        self.use_ref = ctx.executor.runs(REF_INF)
        self.kl_in_loss = not self.critic and S.kl_in == "loss" and self.use_ref
        if self.critic:
            self.kl_ctl = (L.AdaptiveKLController(S.kl_coef, S.kl_target, S.kl_horizon) if S.adaptive_kl
                           else L.FixedKLController(S.kl_coef))
            self.moments = L.RunningMoments()
            if "kl_ctl" in ctx.host_state:
                self.kl_ctl.load_state_dict(ctx.host_state["kl_ctl"])
                self.moments.load_state_dict(ctx.host_state["moments"])
        if not self.critic and S.dynamic_sampling:
            self.stream = PromptStream(len(self.prompts), ctx.cfg.seed, ctx.host_state)
        self.correction = correction(ctx.cfg)  # of a batch sampled by another policy than π_prox
        self.ahead = sampled_ahead(ctx, S.iterations, self._sample_job)  # None: synchronous

    # ---- rollout --------------------------------------------------------------------------------
    def _sample(self, idx: list[int], it: int, draw: int = 0) -> Rollout:
        ctx, cfg = self.ctx, self.cfg
        batch = [self.prompts[i] for i in idx]
        roll = sample(ctx, ACTOR_GEN, batch,
                      sampling_params(cfg.generation, ctx.eos_ids, cfg.seed, it, draw=draw), k=self.k,
                      version=it)
        roll.scores = score(ctx, ACTOR_GEN, roll)
        return roll

    def _sample_job(self, it: int, version: int):
        """Iteration ``it``'s batch as a job for the generation mesh holding ``version``'s weights
        (asynchronous RL: the same prompts and sampling noise as the synchronous loop's)."""
        ctx, cfg, S = self.ctx, self.cfg, self.S
        batch = [self.prompts[i] for i in global_batch(len(self.prompts), S.batch_size, it, cfg.seed)]
        return sample_job(ctx, ACTOR_GEN, batch, sampling_params(cfg.generation, ctx.eos_ids, cfg.seed, it),
                          k=self.k, version=version)

    def rollout(self, it: int) -> tuple[Rollout, dict]:
        S = self.S
        if self.ahead is not None:  # asynchronous: sampled ahead on the generation mesh
            roll = self.ahead.take(it)
            roll.scores = score(self.ctx, ACTOR_GEN, roll)
            stats = self.ahead.metrics(roll, it)
        elif self.critic or not S.dynamic_sampling:
            roll = self._sample(global_batch(len(self.prompts), S.batch_size, it, self.cfg.seed), it)
            stats = {}
        else:
            roll, stats = self._dynamic_rollout(it)
        dump(self.ctx, it, roll)
        return roll, stats

    def _dynamic_rollout(self, it: int) -> tuple[Rollout, dict]:
        """DAPO's dynamic sampling: draw batch_size prompts at a time, keep the groups whose
        samples do not all score alike, until batch_size groups are kept or max_sampling_rounds
        draws are spent (then train on what was kept and say so)."""
        S, k, kept, drawn, draws = self.S, self.k, [], 0, 0
        while len(kept) < S.batch_size and draws < S.max_sampling_rounds:
            roll = self._sample(self.stream.take(S.batch_size), it, draw=draws)
            spread = (roll.scores.view(-1, k).std(dim=1) > 0).nonzero().flatten().tolist()
            kept += [roll.select(list(range(g * k, (g + 1) * k))) for g in spread]
            drawn, draws = drawn + S.batch_size, draws + 1
        if len(kept) < S.batch_size and self.ctx.main:
            print(f"grpo step {it}: dynamic sampling kept {len(kept)} of {S.batch_size} groups after "
                  f"{draws} draws of {S.batch_size} prompts (the others' samples all scored alike): "
                  "this step trains on fewer; raise grpo.max_sampling_rounds, or grpo.group_size or "
                  "generation.temperature for more varied samples")
        roll = Rollout.concat(kept[:S.batch_size])
        return roll, {"sampling/draws": float(draws), "sampling/prompts_drawn": float(drawn),
                      "sampling/groups_kept": float(min(len(kept), S.batch_size))}

    # ---- advantages -----------------------------------------------------------------------------
    def advantages(self, roll: Rollout, it: int) -> dict:
        """The dataflow's inference phase (old and reference log-probs, values) in one gather — on
        disjoint meshes they compute at the same time — then the estimator's advantages."""
        ctx, S, T = self.ctx, self.S, self.cfg.generation.temperature
        x = ctx.executor
        job_for = {"old_logp": lambda c: logprobs_job(ctx, c.config_call, roll, T, timer=c.name),
                   "ref_logp": lambda c: logprobs_job(ctx, c.config_call, roll, T, timer=c.name),
                   "values": lambda c: values_job(ctx, c.config_call, roll, timer=c.name)}
        calls = x.phase("infer")
        outs = dict(zip([c.produces[0] for c in calls],
                        x.run_sharded_many([job_for[c.produces[0]](c) for c in calls])))
        old, ref = outs["old_logp"], outs.get("ref_logp")
        lp, cu = flatten(old)
        rlp = flatten(ref)[0] if ref is not None else None
        lengths = (cu[1:] - cu[:-1])
        penalty = overlong_penalty(lengths, self.cfg.generation.max_new_tokens, S.overlong_buffer,
                                   S.overlong_penalty)
        scores = roll.scores + penalty
        counted = (roll.ended if S.overlong_filter else torch.ones(len(roll), dtype=torch.bool))
        token_counted = torch.repeat_interleave(counted, lengths)
        if self.critic:
            adv, out = self._gae(roll, scores, old, lp, rlp, cu, outs["values"], token_counted)
        else:
            adv, out = self._outcome(roll, scores, lp, rlp, cu, token_counted, it)
        roll.extra.update({"old_logp": old, "advantages": unflatten(adv, cu),
                           "counted": [[float(c)] * len(r)
                                       for c, r in zip(counted.tolist(), roll.responses)]})
        if self.kl_in_loss:
            roll.extra["ref_logp"] = ref
        n = float(len(roll))
        gen_lp, _ = flatten(roll.gen_logprobs)
        out.update({"score": roll.scores.mean().item(), "response_len": float(cu[-1]) / n,
                    "truncated": (~roll.ended).float().mean().item(),
                    "gen_train_logp_gap": (gen_lp - lp).abs().mean().item()})
        if self.ahead is not None or self.correction != "none":  # π_prox/π_behav over the batch
            out.update({f"async/{k}": v for k, v in behaviour_stats(
                lp, gen_lp, token_counted, self.correction, self.cfg.async_.imp_cap).items()})
        if rlp is not None:
            out["kl_seq"] = L.segment_sum(L.kl_estimate(lp, rlp, "k1" if self.critic else "k3"),
                                          cu).sum().item() / n
        if S.overlong_buffer:
            out["overlong_penalty"] = penalty.mean().item()
        if S.overlong_filter:
            out["counted_frac"] = counted.float().mean().item()
        if ctx.verifier is not None:
            out["pass_rate"] = (roll.scores > 0.5).float().mean().item()
        return out

    def _gae(self, roll, scores, old, lp, rlp, cu, vals, token_counted):
        """PPO: shaped rewards (−β·KL per token, the clipped score at the end), GAE on the critic's
        values, whitening over the global batch, value normalisation by running moments."""
        S = self.S
        values, last_values = split_values(vals)
        v, _ = flatten(values)
        v_raw = self.moments.denormalize(v) if S.value_norm else v
        ended = roll.ended
        boot = torch.zeros(len(roll))
        if S.truncated == "bootstrap":
            last = self.moments.denormalize(last_values) if S.value_norm else last_values
            boot = torch.where(ended, boot, last)
        rewards = L.shape_rewards(scores, lp, lp if rlp is None else rlp, cu,  # no reference: no KL
                                  kl_coef=self.kl_ctl.value,
                                  reward_clip=S.reward_clip, estimator=S.kl_estimator, ended=ended,
                                  truncated=S.truncated, truncation_penalty=S.truncation_penalty)
        dev = self.ctx.device
        adv, ret = gae(rewards.to(dev), v_raw.to(dev), cu.to(dev), bootstrap_values=boot.to(dev),
                       gamma=S.gamma, lam=S.lam)
        adv, ret = adv.cpu(), ret.cpu()
        raw_adv, raw_ret = adv.clone(), ret.clone()
        if S.value_norm:
            self.moments.update(ret)
            ret = self.moments.normalize(ret)
        if S.adv_norm:
            adv = masked_whiten(adv, token_counted if S.overlong_filter else None)
        roll.extra.update({"returns": unflatten(ret, cu), "old_values": values})
        n = float(len(roll))
        return adv, {"reward_total": rewards.sum().item() / n, "advantage_raw": raw_adv.mean().item(),
                     "value": v_raw.mean().item(), "return": raw_ret.mean().item()}

    def _outcome(self, roll, scores, lp, rlp, cu, token_counted, it):
        """The critic-free estimators: a baseline from the group (or the greedy response), the
        KL per token in the reward when ``kl_in: reward``, discounted returns, whitening for
        REINFORCE++."""
        S = self.S
        greedy = self._greedy_scores(roll, it) if S.advantage == "remax" else None
        seq = A.baseline_adjusted(scores, S.advantage, self.k, greedy_scores=greedy)
        token_rewards = None
        if rlp is not None and S.kl_in == "reward":
            token_rewards = -S.kl_coef * L.kl_estimate(lp, rlp, S.kl_estimator)
        adv = A.token_advantages(seq, cu, token_rewards=token_rewards, gamma=S.gamma,
                                 whiten=S.advantage in A.WHITENED, mask=token_counted)
        out = {"advantage_seq_abs": seq.abs().mean().item()}
        if self.k > 1:
            out["informative_groups"] = (scores.view(-1, self.k).std(dim=1) > 0).float().mean().item()
        if greedy is not None:
            out["greedy_score"] = greedy.mean().item()
        return adv, out

    def _greedy_scores(self, roll: Rollout, it: int) -> torch.Tensor:
        """ReMax's baseline: each prompt's greedy response, scored like the samples."""
        ctx, cfg, k = self.ctx, self.cfg, self.k
        prompts = [PromptExample(lineno=0, prompt_ids=roll.prompts[g], record=roll.records[g])
                   for g in range(0, len(roll), k)]
        greedy = sample(ctx, ACTOR_GEN, prompts,
                        sampling_params(cfg.generation, ctx.eos_ids, cfg.seed, it, greedy=True))
        return score(ctx, ACTOR_GEN, greedy)

    # ---- training -------------------------------------------------------------------------------
    def train(self, roll: Rollout, it: int) -> dict:
        ctx, S, T = self.ctx, self.S, self.cfg.generation.temperature
        x = ctx.executor
        fields = {k: roll.extra[k] for k in ("old_logp", "advantages", "counted", "ref_logp",
                                              "returns", "old_values") if k in roll.extra}
        if self.correction != "none":  # the behaviour policy's log-probs, as generation sampled
            fields["behav_logp"] = roll.gen_logprobs
        norm_len = float(S.loss_agg_len or self.cfg.generation.max_new_tokens)

        def batches(call):
            return lambda local: microbatches(roll, local, x.max_tokens(call), fields, x.sp_pad(call))

        def counts(call, mbs):
            layout = ctx.executor.layout(call)
            return LossCounts(tokens=max(global_token_count(mbs, layout, "action_mask"), 1.0),
                              seqs=max(global_seq_count(mbs, layout, "action_mask"), 1.0),
                              norm_len=norm_len)

        actor = lambda mbs: policy_call(  # noqa: E731
            counts(ACTOR_TRAIN, mbs), kind=S.policy_loss, agg=S.loss_agg, temperature=T,
            clip_eps_low=S.clip_eps_low or S.clip_eps, clip_eps_high=S.clip_eps_high or S.clip_eps,
            clip_ratio_c=S.clip_ratio_c, entropy_coef=S.entropy_coef,
            kl_coef=S.kl_coef if self.kl_in_loss else 0.0, kl_estimator=S.kl_estimator,
            correction=self.correction, imp_cap=self.cfg.async_.imp_cap)
        critic = lambda mbs: ppo_critic_call(counts(CRITIC_TRAIN, mbs).tokens,  # noqa: E731
                                             value_clip=S.value_clip)
        loss_of = {ACTOR_TRAIN: actor, CRITIC_TRAIN: critic}
        calls = ctx.executor.phase("train")
        blends = x.blends(UPDATE)
        totals, n = {}, 0
        for epoch in range(S.epochs):
            for mb_idx in split_even(epoch_order(len(roll), self.cfg.seed + it, epoch), S.minibatches):
                if not mb_idx:  # a dynamic-sampling batch smaller than the minibatch count
                    continue
                # the train phase's steps (actor, critic) in one gather: on disjoint meshes they overlap
                outs = x.train_calls([TrainJob(c.name, mb_idx, batches(c.name), loss_of[c.name])
                                        for c in calls])
                m = {f"{c.model}/{k}": v for c, out in zip(calls, outs) for k, v in out.items()}
                for dst, src in blends:  # the EMA reference trails the actor; the critic never reads it
                    with ctx.services.timed("ema_ref"):
                        x.blend(dst, src, S.ema_alpha)
                for k, v in m.items():
                    totals[k] = totals.get(k, 0.0) + v
                n += 1
        return {k: v / max(n, 1) for k, v in totals.items()}

    def step(self, it: int) -> dict:
        ctx = self.ctx
        # idle optimizer state leaves the device while generation runs, unless generation runs
        # on ranks of its own (asynchronous: it samples the next batch meanwhile)
        x = ctx.executor
        trained = [x.model(c.name) for c in x.phase("train")] if self.ahead is None else []
        for m in trained:
            m.offload()
        roll, metrics = self.rollout(it)
        if len(roll):
            metrics.update(self.advantages(roll, it))
        for m in trained:
            m.reload()
        if len(roll):
            metrics.update(self.train(roll, it))
        if self.ahead is not None:
            self.ahead.collect()
        if self.critic:
            self.kl_ctl.update(metrics.get("kl_seq", 0.0), self.S.batch_size)
            metrics["kl_coef"] = self.kl_ctl.value
            ctx.host_state.update(kl_ctl=self.kl_ctl.state_dict(), moments=self.moments.state_dict())
        return metrics


def run(ctx) -> dict:
    loop = PolicyGradient(ctx)
    S = loop.S
    show = ("score", "kl_seq", "actor/actor_loss") if loop.critic else ("score", "kl_seq")
    return run_loop(ctx, S.iterations, loop.step, desc=ctx.cfg.algorithm,
                    limit_key=f"{ctx.cfg.algorithm}.iterations",
                    eval_fn=lambda step: evaluate_pass_rate(ctx, ACTOR_GEN, step),
                    eval_data=lambda: held_out_prompts(ctx), show=show,
                    updates_per_step=S.epochs * S.minibatches)
