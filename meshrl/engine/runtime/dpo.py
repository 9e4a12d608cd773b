"""DPO: offline on a preference dataset, or iterative online — each round samples k responses per
prompt from the current policy, labels them (reward model or verifier), pairs best against worst
(prompts whose samples all score equal are skipped), trains, and makes the result the next round's
reference."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from meshrl.engine.algorithms.calls import dpo_call
from meshrl.engine.dataflow import ACTOR_GEN, ACTOR_TRAIN, REF_INF, ROUND

from .loop import (data_lengths, epoch_order, evaluate_pass_rate, global_batch, held_out,
                   held_out_prompts, run_loop, step_count, train_prompts, training_data)
from .asynchronous import sampled_ahead
from .rollout import sample_job, sample_now, sampling_params, score
from .supervised import _load_pairs, pair_microbatches, pair_position_logps


@dataclass(frozen=True)
class OnlinePair:
    prompt_ids: list
    chosen_ids: list
    rejected_ids: list
    margin: float


class DPO:
    def __init__(self, ctx):
        self.ctx, self.cfg, self.D = ctx, ctx.cfg, ctx.cfg.dpo

    def train_step(self, pairs: list) -> dict:
        """One optimizer step on ``pairs`` (the global batch): reference log-probs from the ref
        call's layout, then the actor's step on its replicas' shares."""
        ctx, D = self.ctx, self.D
        ref = pair_position_logps(ctx, REF_INF, pairs)
        index = {id(p): i for i, p in enumerate(pairs)}
        x = ctx.executor
        mt, pad = x.max_tokens(ACTOR_TRAIN), x.sp_pad(ACTOR_TRAIN)
        dp_group = ctx.executor.layout(ACTOR_TRAIN).dp_group

        def make(local):
            return pair_microbatches(local, mt, pad, ref_logps=[ref[index[id(p)]] for p in local])

        def loss_of(mbs):
            from meshrl.engine.train import global_sum
            chosen = global_sum(sum(float((mb.tokens["loss_mask"] * mb.tokens["is_chosen"]).sum())
                                    for mb in mbs), dp_group)
            return dpo_call(float(len(pairs)), chosen, beta=D.beta, loss_type=D.loss_type,
                            length_normalize=length_normalized(D),
                            label_smoothing=D.label_smoothing, sft_coef=D.sft_coef)

        metrics = ctx.executor.train_call(ACTOR_TRAIN, pairs, make, loss_of)
        return {**metrics, **data_lengths(pairs)}

    # ---- offline --------------------------------------------------------------------------------
    def run_offline(self) -> dict:
        ctx, cfg, D = self.ctx, self.cfg, self.D
        data = training_data(ctx, _load_pairs(ctx, cfg.data.train))

        def step(s):
            return self.train_step([data[i] for i in global_batch(len(data), D.batch_size, s, cfg.seed)])

        total = step_count(len(data), D.batch_size, D.epochs, D.steps)
        return run_loop(ctx, total, step, desc="dpo", limit_key="dpo.steps (or dpo.epochs)",
                        eval_fn=self.evaluate, eval_data=self.eval_data,
                        show=("loss", "rewards_accuracy", "rewards_margin"))

    def eval_data(self):
        """Held-out prompts (with a verifier: the pass rate) or pairs (the implicit margins)."""
        return held_out_prompts(self.ctx) or held_out(self.ctx, "pairs",
                                                      lambda path: _load_pairs(self.ctx, path))

    def evaluate(self, step: int) -> dict:
        gen = ACTOR_GEN if self.ctx.executor.has(ACTOR_GEN) else ACTOR_TRAIN
        out = evaluate_pass_rate(self.ctx, gen,
                                 step)
        if self.cfg.data.eval and not self.ctx.verifier:
            m = self.implicit_margins(self.eval_data())
            out = {"accuracy": (m > 0).float().mean().item(), "margin": m.mean().item()}
            self.ctx.services.log(step, out, phase="eval")
        return out

    def implicit_margins(self, pairs) -> torch.Tensor:
        """β·[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)] per pair."""
        def seq_logps(per_pair):  # the training loss's sums or means over each response
            mean = length_normalized(self.D)
            return torch.tensor([[sum(r) / (len(r) if mean else 1) for r in
                                  (lp[len(p.prompt_ids) - 1:-1] for lp in pair)]
                                 for p, pair in zip(pairs, per_pair)])
        pol = seq_logps(pair_position_logps(self.ctx, ACTOR_TRAIN, pairs))
        ref = seq_logps(pair_position_logps(self.ctx, REF_INF, pairs))
        diff = pol - ref
        return self.D.beta * (diff[:, 0] - diff[:, 1])

    # ---- iterative online ---------------------------------------------------------------------
    def round_job(self, round_: int, version: int, prompts):
        """The round's sampling (k per prompt) as a job for the generation layout, whose weights
        are the policy's ``version`` (`sample_job`)."""
        ctx, cfg, D = self.ctx, self.cfg, self.D
        batch = [prompts[i] for i in global_batch(len(prompts), min(D.prompts_per_round, len(prompts)),
                                                  round_, cfg.seed)]
        return sample_job(ctx, ACTOR_GEN, batch, sampling_params(cfg.generation, ctx.eos_ids, cfg.seed,
                                                                   round_), k=D.samples_per_prompt,
                          version=version)

    def make_pairs(self, round_: int, roll) -> tuple[list, dict]:
        """Label the round's samples and pair best vs worst; identical on every rank."""
        ctx, D = self.ctx, self.D
        k = D.samples_per_prompt
        scores = score(ctx, ACTOR_GEN, roll)
        picks = best_worst(scores, k, D.min_margin)
        if not picks and ctx.main:
            print(no_pairs_message(round_, len(roll) // k, D.min_margin))
        pairs = [OnlinePair(roll.prompts[g * k], roll.responses[g * k + best],
                            roll.responses[g * k + worst], margin) for g, best, worst, margin in picks]
        return pairs, {"score": scores.mean().item(), "skipped_prompts": 1 - len(picks) * k / len(roll)}

    def run_iterative(self) -> dict:
        ctx, cfg, D = self.ctx, self.cfg, self.D
        prompts = train_prompts(ctx)
        make_job = lambda r, version: self.round_job(r, version, prompts)  # noqa: E731
        # asynchronous: the generation mesh samples the next rounds while this one trains
        ahead = sampled_ahead(ctx, D.rounds, make_job)

        def round_step(r):
            if ahead is None:
                ctx.executor.prepare(ACTOR_GEN)
                roll, stale = sample_now(ctx, *make_job(r, r)), {}
            else:
                roll = ahead.take(r)
                stale = ahead.metrics(roll, r)
            pairs, stats = self.make_pairs(r, roll)
            stats.update(stale)
            totals, n = {}, 0
            for epoch in range(D.epochs):
                order = epoch_order(len(pairs), cfg.seed + r, epoch)
                for chunk in _batches(order, D.batch_size):
                    for key, v in self.train_step([pairs[i] for i in chunk]).items():
                        totals[key] = totals.get(key, 0.0) + v
                    n += 1
            for dst, src in ctx.executor.blends(ROUND):  # the result becomes the next round's reference
                ctx.executor.blend(dst, src, None)
            stats.update({k: v / max(n, 1) for k, v in totals.items()}, pairs=float(len(pairs)))
            if ahead is not None:
                ahead.collect()
            return stats

        return run_loop(ctx, D.rounds, round_step, desc="dpo-iter", limit_key="dpo.rounds",
                        eval_fn=self.evaluate, eval_data=self.eval_data, show=("score", "pairs", "loss"))


def length_normalized(D) -> bool:
    """dpo.length_normalize, resolved: means per token for ipo, sums for sigmoid unless set."""
    return D.loss_type == "ipo" if D.length_normalize is None else D.length_normalize


def best_worst(scores: torch.Tensor, k: int, min_margin: float | None) -> list[tuple[int, int, int, float]]:
    """(group, best, worst, margin) per group of ``k`` consecutive scores whose best beats its
    worst, by at least ``min_margin`` when set; ties and smaller margins are skipped."""
    picks = []
    for g in range(len(scores) // k):
        s = scores[g * k:(g + 1) * k]
        best, worst = int(torch.argmax(s)), int(torch.argmin(s))
        margin = float(s[best] - s[worst])
        if margin > 0 and (min_margin is None or margin >= min_margin):
            picks.append((g, best, worst, margin))
    return picks


def no_pairs_message(round_: int, prompts: int, min_margin: float | None) -> str:
    why = "every prompt's samples scored alike" + (
        f" or differed by less than dpo.min_margin={min_margin:g}" if min_margin is not None else "")
    return (f"dpo round {round_}: no pairs from {prompts} prompts ({why}), so the actor did not train "
            "this round: raise dpo.samples_per_prompt or generation.temperature"
            + (", or lower dpo.min_margin" if min_margin is not None else ""))


def _batches(order: list, size: int) -> list[list]:
    """Full batches only: a tail smaller than the batch would change the step's effective size."""
    return [order[i:i + size] for i in range(0, len(order) - size + 1, size)] or ([order] if order else [])


def run(ctx) -> dict:
    dpo = DPO(ctx)
    return dpo.run_iterative() if dpo.D.rounds > 0 else dpo.run_offline()
