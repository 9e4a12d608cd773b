"""SFT and reward-model training: fixed datasets, one optimizer step per global batch."""
from __future__ import annotations

from meshrl.engine.algorithms.calls import logprobs_call, reward_model_call, scores_call, sft_call
from meshrl.engine.algorithms.losses import sequence_logps
from meshrl.engine.batch import pack, split_by_tokens
from meshrl.engine.data.datasets import load_sft
from meshrl.engine.data.preference import load_pairs
from meshrl.engine.dataflow import ACTOR_TRAIN, RM_TRAIN
from meshrl.engine.train import global_token_count, infer

from .loop import (data_lengths, evaluate_pass_rate, global_batch, held_out, held_out_prompts,
                   loaded, run_loop, step_count, training_data)


def sft_microbatches(examples, max_tokens: int, pad: int = 1):
    seqs = [e.prompt_ids + e.response_ids for e in examples]
    groups = split_by_tokens([len(s) for s in seqs], max_tokens)
    return [pack([seqs[i] for i in g], loss_from=[len(examples[i].prompt_ids) - 1 for i in g],
                 pad_to_multiple=pad) for g in groups]


def pair_microbatches(pairs, max_tokens: int, pad: int = 1, *, ref_logps=None):
    """Pairs packed chosen, rejected, chosen, … never split across microbatches. ``ref_logps``
    (per pair: per-position log-probs of its chosen and rejected sequences) rides along as a token
    field, with an ``is_chosen`` field for the DPO+SFT term."""
    lengths = [2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    out = []
    for g in split_by_tokens(lengths, max_tokens):
        seqs, loss_from, is_chosen, ref = [], [], [], []
        for i in g:
            p = pairs[i]
            for k, (resp, flag) in enumerate(((p.chosen_ids, 1.0), (p.rejected_ids, 0.0))):
                seqs.append(p.prompt_ids + resp)
                loss_from.append(len(p.prompt_ids) - 1)
                is_chosen.append([flag] * len(seqs[-1]))
                if ref_logps is not None:
                    ref.append(ref_logps[i][k])
        fields = {"is_chosen": is_chosen, **({"ref_logp": ref} if ref_logps is not None else {})}
        out.append(pack(seqs, loss_from=loss_from, token_fields=fields, pad_to_multiple=pad))
    return out


def _real_seqs(mbs, outs):
    """Per-sequence slices of per-position outputs, real sequences only, in packing order."""
    res = []
    for mb, vals in zip(mbs, outs):
        cu = mb.meta.cu_seqlens.tolist()
        res += [vals[cu[b]:cu[b + 1]] for b in range(int(mb.seqs["real"].sum()))]
    return res


def pair_position_logps(ctx, call: str, pairs) -> list:
    """Per pair: (chosen, rejected) per-position log-probs under the call's model."""
    ctx.executor.prepare(call)
    mt, pad = ctx.executor.max_tokens(call), ctx.executor.sp_pad(call)

    def fn(stage, local, first):
        mbs = pair_microbatches(local, mt, pad)
        seqs = [s.tolist() for s in _real_seqs(mbs, infer(stage, mbs, logprobs_call()))]
        return [(seqs[2 * i], seqs[2 * i + 1]) for i in range(len(local))]

    return ctx.executor.run_sharded(call, pairs, fn)


def run_sft(ctx) -> dict:
    cfg, S, d = ctx.cfg, ctx.cfg.sft, ctx.cfg.data
    data = training_data(ctx, _load_sft(ctx, d.train))
    mt, pad = ctx.executor.max_tokens(ACTOR_TRAIN), ctx.executor.sp_pad(ACTOR_TRAIN)
    layout = ctx.executor.layout(ACTOR_TRAIN)

    def step(s):
        batch = [data[i] for i in global_batch(len(data), S.batch_size, s, cfg.seed)]
        metrics = ctx.executor.train_call(ACTOR_TRAIN, batch, lambda local: sft_microbatches(local, mt, pad),
                                 lambda mbs: sft_call(global_token_count(mbs, layout)))
        return {**metrics, **data_lengths(batch)}

    def eval_data():
        return held_out_prompts(ctx) or held_out(ctx, "sft", lambda path: _load_sft(ctx, path))

    def evaluate(s):
        out = evaluate_pass_rate(ctx, ACTOR_TRAIN, s)
        if d.eval and not ctx.verifier:
            ev = eval_data()

            def fn(stage, local, first):
                mbs = sft_microbatches(local, mt, pad)
                outs = infer(stage, mbs, logprobs_call())
                return [(-float(sequence_logps(lp, mb.meta.cu_seqlens, mb.tokens["loss_mask"].bool())
                                [b]), float(mb.tokens["loss_mask"][mb.meta.cu_seqlens[b]:
                                                                  mb.meta.cu_seqlens[b + 1]].sum()))
                        for lp, mb in zip(outs, mbs) for b in range(int(mb.seqs["real"].sum()))]
            res = ctx.executor.run_sharded(ACTOR_TRAIN, ev, fn)
            out = {"loss": sum(r[0] for r in res) / max(1.0, sum(r[1] for r in res))}
            ctx.services.log(s, out, phase="eval")
        return out

    return run_loop(ctx, step_count(len(data), S.batch_size, S.epochs, S.steps), step, desc="sft",
                    limit_key="sft.steps (or sft.epochs)", eval_fn=evaluate, eval_data=eval_data,
                    show=("loss",))


def _load_sft(ctx, path):
    d = ctx.cfg.data
    return loaded(ctx, load_sft(path, ctx.tokenizer, max_len=d.max_len, chat_template=d.chat_template,
                                format=d.format, too_long=d.too_long))


def _load_pairs(ctx, path):
    d = ctx.cfg.data
    return loaded(ctx, load_pairs(path, ctx.tokenizer, max_len=d.max_len, format=d.format,
                                  chat_template=d.chat_template, preference=d.preference,
                                  safety_filter=d.safety_filter, too_long=d.too_long))


def pair_scores(ctx, call: str, pairs) -> list:
    """Reward-model (chosen, rejected) scores per pair."""
    mt, pad = ctx.executor.max_tokens(call), ctx.executor.sp_pad(call)

    def fn(stage, local, first):
        mbs = pair_microbatches(local, mt, pad)
        outs = infer(stage, mbs, scores_call())
        s = [v for o, mb in zip(outs, mbs) for v in o[mb.seqs["real"].bool()].tolist()]
        return [(s[2 * i], s[2 * i + 1]) for i in range(len(local))]

    return ctx.executor.run_sharded(call, pairs, fn)


def run_rm(ctx) -> dict:
    cfg, R = ctx.cfg, ctx.cfg.rm
    data = training_data(ctx, _load_pairs(ctx, cfg.data.train))
    mt, pad = ctx.executor.max_tokens(RM_TRAIN), ctx.executor.sp_pad(RM_TRAIN)

    def step(s):
        batch = [data[i] for i in global_batch(len(data), R.batch_size, s, cfg.seed)]
        metrics = ctx.executor.train_call(RM_TRAIN, batch, lambda local: pair_microbatches(local, mt, pad),
                                 lambda mbs: reward_model_call(float(len(batch))))
        return {**metrics, **data_lengths(batch)}

    def eval_data():
        return held_out(ctx, "pairs", lambda path: _load_pairs(ctx, path))

    def evaluate(s):
        if not cfg.data.eval:
            return {}
        sc = pair_scores(ctx, RM_TRAIN, eval_data())
        out = {"accuracy": sum(c > r for c, r in sc) / len(sc),
               "margin": sum(c - r for c, r in sc) / len(sc)}
        ctx.services.log(s, out, phase="eval")
        return out

    return run_loop(ctx, step_count(len(data), R.batch_size, R.epochs, R.steps), step, desc="rm",
                    limit_key="rm.steps (or rm.epochs)", eval_fn=evaluate, eval_data=eval_data,
                    show=("loss", "accuracy"))
