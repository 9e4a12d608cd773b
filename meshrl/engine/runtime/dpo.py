"""DPO: offline on a preference dataset, or iterative online — each round samples k responses per
prompt from the current policy, labels them (reward model or verifier), pairs best against worst
(prompts whose samples all score equal are skipped), trains, and makes the result the next round's
reference."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from meshrl.engine.algorithms.calls import dpo_call, logprobs_call
from meshrl.engine.batch import split_even
from meshrl.engine.data.datasets import load_prompts
from meshrl.engine.runtime.models import copy_weights_
from meshrl.engine.train import global_sum, global_token_count, infer

from .common import epoch_order, evaluate_pass_rate, global_batch, global_means, run_loop
from .rollout import reward_model_scores, sample, sampling_params, score_with_verifier
from .supervised import _load_pairs, pair_microbatches


@dataclass(frozen=True)
class OnlinePair:
    prompt_ids: list
    chosen_ids: list
    rejected_ids: list
    margin: float


class DPO:
    def __init__(self, ctx):
        self.ctx, self.cfg, self.D = ctx, ctx.cfg, ctx.cfg.dpo
        self.actor, self.ref = ctx.model("actor_train"), ctx.model("ref_inf")
        self.layout = ctx.layout("actor_train")

    def train_step(self, pairs_global: list, local: list) -> dict:
        """One optimizer step on this replica's ``local`` share of ``pairs_global``."""
        ctx, D = self.ctx, self.D
        mbs = pair_microbatches(local, ctx.max_tokens("actor_train"), ctx.sp_pad("actor_train"),
                                chosen_field=True)
        for mb, ref in zip(mbs, infer(self.ref.stage, mbs, logprobs_call())):
            mb.tokens["ref_logp"] = ref
        chosen_tokens = global_sum(sum(float((mb.tokens["loss_mask"] * mb.tokens["is_chosen"]).sum())
                                       for mb in mbs), self.layout.dp_group)
        return self.actor.trainer.step(mbs, dpo_call(
            float(len(pairs_global)), chosen_tokens, beta=D.beta, loss_type=D.loss_type,
            label_smoothing=D.label_smoothing, sft_coef=D.sft_coef))

    # ---- offline --------------------------------------------------------------------------------
    def run_offline(self) -> dict:
        ctx, cfg, D = self.ctx, self.cfg, self.D
        data = _load_pairs(ctx, cfg.data.train)

        def step(s):
            batch = [data[i] for i in global_batch(len(data), D.batch_size, s, cfg.seed)]
            return self.train_step(batch, ctx.dp_share(batch, "actor_train")[0])

        total = max(1, D.epochs * (len(data) // D.batch_size))
        return run_loop(ctx, total, step, desc="dpo", eval_fn=self.evaluate,
                        show=("loss", "rewards_accuracy", "rewards_margin"))

    def evaluate(self, step: int) -> dict:
        out = evaluate_pass_rate(self.ctx, "actor_train", step)
        if self.cfg.data.eval and not self.ctx.verifier:
            pairs = _load_pairs(self.ctx, self.cfg.data.eval)[:self.cfg.data.eval_samples]
            local, _ = self.ctx.dp_share(pairs, "actor_train")
            m = self.implicit_margins(local)
            out = global_means({"accuracy": (float((m > 0).sum()), float(len(m))),
                                "margin": (float(m.sum()), float(len(m)))},
                               self.layout.dp_group, self.ctx.device)
            self.ctx.log(step, out, phase="eval")
        return out

    def implicit_margins(self, pairs) -> torch.Tensor:
        """β·[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)] per pair."""
        from meshrl.engine.algorithms.losses import sequence_logps
        ctx = self.ctx
        mbs = pair_microbatches(pairs, ctx.max_tokens("actor_train"), ctx.sp_pad("actor_train"))
        out = []
        for stage in (self.actor.stage, self.ref.stage):
            seq = [sequence_logps(lp, mb.meta.cu_seqlens, mb.tokens["loss_mask"].bool())
                   [mb.seqs["real"].bool()] for lp, mb in zip(infer(stage, mbs, logprobs_call()), mbs)]
            out.append(torch.cat(seq).view(-1, 2))
        diff = out[0] - out[1]
        return self.D.beta * (diff[:, 0] - diff[:, 1])

    # ---- iterative online ---------------------------------------------------------------------
    def make_pairs(self, round_: int, prompts) -> tuple[list, dict]:
        """Sample k per prompt, label, pair best vs worst. Returns (pairs, metrics); the pairs of
        every replica are gathered, so all ranks agree on the round's list."""
        ctx, cfg, D = self.ctx, self.cfg, self.D
        batch = global_batch(len(prompts), min(D.prompts_per_round, len(prompts)), round_, cfg.seed)
        local, first = ctx.dp_share([prompts[i] for i in batch], "actor_gen")
        roll = sample(self.actor.stage, [p.prompt_ids for p in local], [p.record for p in local],
                      first, sampling_params(cfg.generation, ctx.eos_ids, cfg.seed, round_),
                      samples_per_prompt=D.samples_per_prompt, batch_size=cfg.generation.batch_size,
                      device=ctx.device)
        if ctx.verifier is not None:
            scores = score_with_verifier(roll, ctx.verifier, ctx.tokenizer, ctx.layout("actor_gen"))
        else:
            scores = reward_model_scores(ctx.model("rew_inf").stage, roll, ctx.max_tokens("rew_inf"),
                                         ctx.sp_pad("rew_inf"))
        k = D.samples_per_prompt
        pairs, ties = [], 0
        for g in range(len(local)):
            s = scores[g * k:(g + 1) * k]
            best, worst = int(torch.argmax(s)), int(torch.argmin(s))
            margin = float(s[best] - s[worst])
            if margin <= 0 or (D.min_margin is not None and margin < D.min_margin):
                ties += 1
                continue
            pairs.append(OnlinePair(roll.prompts[g * k], roll.responses[g * k + best],
                                    roll.responses[g * k + worst], margin))
        layout = ctx.layout("actor_gen")
        stats = global_means({"score": (float(scores.sum()), float(len(scores))),
                              "skipped_prompts": (float(ties), float(len(local)))},
                             layout.dp_group, ctx.device)
        everyone = _all_gather_objects(pairs, layout.dp_group)
        return everyone, stats

    def run_iterative(self) -> dict:
        ctx, cfg, D = self.ctx, self.cfg, self.D
        d = cfg.data
        prompts = load_prompts(d.train, ctx.tokenizer, max_prompt_len=d.max_prompt_len,
                               chat_template=d.chat_template)

        def round_step(r):
            pairs, stats = self.make_pairs(r, prompts)
            totals, n = {}, 0
            for epoch in range(D.epochs):
                order = epoch_order(len(pairs), cfg.seed + r, epoch)
                for chunk in _batches(order, D.batch_size):
                    batch = [pairs[i] for i in chunk]
                    local = split_even(batch, self.layout.dp_size)[self.layout.dp_rank]
                    for key, v in self.train_step(batch, local).items():
                        totals[key] = totals.get(key, 0.0) + v
                    n += 1
            copy_weights_(self.ref.stage, self.actor.stage)  # the result becomes the next reference
            stats.update({k: v / max(n, 1) for k, v in totals.items()}, pairs=float(len(pairs)))
            return stats

        return run_loop(ctx, D.rounds, round_step, desc="dpo-iter", eval_fn=self.evaluate,
                        show=("score", "pairs", "loss"))


def _batches(order: list, size: int) -> list[list]:
    """Full batches only: a tail smaller than the batch would change the step's effective size."""
    return [order[i:i + size] for i in range(0, len(order) - size + 1, size)] or ([order] if order else [])


def _all_gather_objects(obj, group):
    import torch.distributed as dist
    if group is None:
        return list(obj)
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return [x for p in parts for x in p]


def run(ctx) -> dict:
    dpo = DPO(ctx)
    return dpo.run_iterative() if dpo.D.rounds > 0 else dpo.run_offline()
