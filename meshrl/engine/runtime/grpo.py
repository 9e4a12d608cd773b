"""GRPO: k samples per prompt, rewards normalised within each prompt's group, no critic, k3 KL to
the reference inside the loss."""
from __future__ import annotations

from meshrl.engine.algorithms import losses as L
from meshrl.engine.algorithms.calls import grpo_actor_call
from meshrl.engine.batch import split_even
from meshrl.engine.train import global_token_count

from .common import (epoch_order, evaluate_pass_rate, global_batch, held_out_prompts, run_loop,
                     train_prompts)
from .rollout import dump, flatten, logprobs_job, microbatches, sample, sampling_params, score


class GRPO:
    def __init__(self, ctx):
        self.ctx, self.cfg, self.G = ctx, ctx.cfg, ctx.cfg.grpo
        self.prompts = train_prompts(ctx)

    def step(self, it: int) -> dict:
        ctx, cfg, G = self.ctx, self.cfg, self.G
        batch = [self.prompts[i] for i in global_batch(len(self.prompts), G.batch_size, it, cfg.seed)]
        roll = sample(ctx, "actor_gen", batch, sampling_params(cfg.generation, ctx.eos_ids, cfg.seed, it),
                      k=G.group_size)
        roll.scores = score(ctx, "actor_gen", roll)
        dump(ctx, it, roll)
        T = cfg.generation.temperature
        old, ref = ctx.run_sharded_many([logprobs_job(ctx, "actor_train", roll, T, timer="actor_inf"),
                                          logprobs_job(ctx, "ref_inf", roll, T)])
        adv_seq = L.group_normalize(roll.scores, G.group_size)
        fields = {"old_logp": old, "ref_logp": ref,
                  "advantages": [[float(a)] * len(r) for a, r in zip(adv_seq, roll.responses)]}
        mt, pad = ctx.max_tokens("actor_train"), ctx.sp_pad("actor_train")
        totals, n = {}, 0
        for epoch in range(G.epochs):
            for mb_idx in split_even(epoch_order(len(roll), cfg.seed + it, epoch), G.minibatches):
                with ctx.timed("actor_train"):
                    m = ctx.train_call(
                        "actor_train", mb_idx, lambda local: microbatches(roll, local, mt, fields, pad),
                        lambda mbs: grpo_actor_call(
                            global_token_count(mbs, ctx.layout("actor_train"), "action_mask"),
                            clip_eps=G.clip_eps, kl_coef=G.kl_coef, temperature=T))
                for k, v in m.items():
                    totals[f"actor/{k}"] = totals.get(f"actor/{k}", 0.0) + v
                n += 1
        lp, cu = flatten(old)
        rlp, _ = flatten(ref)
        groups = roll.scores.view(-1, G.group_size)
        out = {"score": roll.scores.mean().item(),
               "kl_seq": L.segment_sum(L.kl_k3(lp, rlp), cu).mean().item(),
               "response_len": float(cu[-1]) / len(roll),
               "informative_groups": (groups.std(dim=1) > 0).float().mean().item()}
        if ctx.verifier is not None:
            out["pass_rate"] = (roll.scores > 0.5).float().mean().item()
        out.update({k: v / max(n, 1) for k, v in totals.items()})
        return out


def run(ctx) -> dict:
    grpo = GRPO(ctx)
    return run_loop(ctx, grpo.G.iterations, grpo.step, desc="grpo", limit_key="grpo.iterations",
                    eval_fn=lambda step: evaluate_pass_rate(ctx, "actor_gen", step),
                    eval_data=lambda: held_out_prompts(ctx),
                    show=("score", "kl_seq"), updates_per_step=grpo.G.epochs * grpo.G.minibatches)
