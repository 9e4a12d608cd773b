"""GRPO: k samples per prompt, rewards normalised within each prompt's group, no critic, k3 KL to
the reference inside the loss."""
from __future__ import annotations

from meshrl.engine.algorithms import losses as L
from meshrl.engine.algorithms.calls import grpo_actor_call
from meshrl.engine.batch import split_even
from meshrl.engine.data.datasets import load_prompts
from meshrl.engine.train import global_token_count

from .common import epoch_order, evaluate_pass_rate, global_batch, global_means, run_loop
from .rollout import (flatten, logprobs_of, microbatches, reward_model_scores, sample,
                      sampling_params, score_with_verifier)


class GRPO:
    def __init__(self, ctx):
        self.ctx, self.cfg, self.G = ctx, ctx.cfg, ctx.cfg.grpo
        d = self.cfg.data
        self.prompts = load_prompts(d.train, ctx.tokenizer, max_prompt_len=d.max_prompt_len,
                                    chat_template=d.chat_template)
        self.actor, self.ref = ctx.model("actor_train"), ctx.model("ref_inf")

    def step(self, it: int) -> dict:
        ctx, cfg, G = self.ctx, self.cfg, self.G
        layout = ctx.layout("actor_train")
        batch = global_batch(len(self.prompts), G.batch_size, it, cfg.seed)
        local, first = ctx.dp_share([self.prompts[i] for i in batch], "actor_gen")
        params = sampling_params(cfg.generation, ctx.eos_ids, cfg.seed, it)
        roll = sample(self.actor.stage, [p.prompt_ids for p in local], [p.record for p in local],
                      first, params, samples_per_prompt=G.group_size,
                      batch_size=cfg.generation.batch_size, device=ctx.device)
        if ctx.verifier is not None:
            roll.scores = score_with_verifier(roll, ctx.verifier, ctx.tokenizer, ctx.layout("actor_gen"))
        else:
            roll.scores = reward_model_scores(ctx.model("rew_inf").stage, roll,
                                              ctx.max_tokens("rew_inf"), ctx.sp_pad("rew_inf"))
        T, mt, pad = cfg.generation.temperature, ctx.max_tokens("actor_train"), ctx.sp_pad("actor_train")
        old = logprobs_of(self.actor.stage, roll, T, mt, pad)
        ref = logprobs_of(self.ref.stage, roll, T, ctx.max_tokens("ref_inf"), ctx.sp_pad("ref_inf"))
        adv_seq = L.group_normalize(roll.scores, G.group_size)
        roll.extra = {"old_logp": old, "ref_logp": ref,
                      "advantages": [[float(a)] * len(r) for a, r in zip(adv_seq, roll.responses)]}
        totals, n = {}, 0
        for epoch in range(G.epochs):
            order = epoch_order(len(roll), cfg.seed + it, epoch)
            for mb_idx in split_even(order, G.minibatches):
                mbs = microbatches(roll, mb_idx, mt, roll.extra, pad)
                m = self.actor.trainer.step(mbs, grpo_actor_call(
                    global_token_count(mbs, layout, "action_mask"), clip_eps=G.clip_eps,
                    kl_coef=G.kl_coef))
                for k, v in m.items():
                    totals[f"actor/{k}"] = totals.get(f"actor/{k}", 0.0) + v
                n += 1
        lp, cu = flatten(old)
        rlp, _ = flatten(ref)
        kl = L.segment_sum(L.kl_k3(lp, rlp), cu)
        groups = roll.scores.view(-1, G.group_size)
        sums = {"score": (float(roll.scores.sum()), float(len(roll))),
                "kl_seq": (float(kl.sum()), float(len(roll))),
                "response_len": (float((cu[1:] - cu[:-1]).sum()), float(len(roll))),
                "informative_groups": (float((groups.std(dim=1) > 0).sum()), float(groups.shape[0]))}
        if ctx.verifier is not None:
            sums["pass_rate"] = (float((roll.scores > 0.5).sum()), float(len(roll)))
        out = global_means(sums, layout.dp_group, ctx.device)
        out.update({k: v / max(n, 1) for k, v in totals.items()})
        return out


def run(ctx) -> dict:
    grpo = GRPO(ctx)
    return run_loop(ctx, grpo.G.iterations, grpo.step, desc="grpo",
                    eval_fn=lambda step: evaluate_pass_rate(ctx, "actor_gen", step),
                    show=("score", "kl_seq"), updates_per_step=grpo.G.epochs * grpo.G.minibatches)

