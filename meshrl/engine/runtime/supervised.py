"""SFT and reward-model training: fixed datasets, one optimizer step per global batch."""
from __future__ import annotations

import torch

from meshrl.engine.algorithms.calls import reward_model_call, scores_call, sft_call
from meshrl.engine.batch import pack, split_by_tokens
from meshrl.engine.data.datasets import load_sft
from meshrl.engine.data.preference import load_pairs
from meshrl.engine.train import global_sum, global_token_count, infer

from .common import evaluate_pass_rate, global_batch, global_means, run_loop


def sft_microbatches(examples, max_tokens: int, pad: int = 1):
    seqs = [e.prompt_ids + e.response_ids for e in examples]
    groups = split_by_tokens([len(s) for s in seqs], max_tokens)
    return [pack([seqs[i] for i in g], loss_from=[len(examples[i].prompt_ids) - 1 for i in g],
                 pad_to_multiple=pad) for g in groups]


def pair_microbatches(pairs, max_tokens: int, pad: int = 1, chosen_field: bool = False):
    """Pairs packed chosen, rejected, chosen, … never split across microbatches."""
    lengths = [2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    out = []
    for g in split_by_tokens(lengths, max_tokens):
        seqs, loss_from, is_chosen = [], [], []
        for i in g:
            p = pairs[i]
            for resp, flag in ((p.chosen_ids, 1.0), (p.rejected_ids, 0.0)):
                seqs.append(p.prompt_ids + resp)
                loss_from.append(len(p.prompt_ids) - 1)
                is_chosen.append([flag] * len(seqs[-1]))
        fields = {"is_chosen": is_chosen} if chosen_field else None
        out.append(pack(seqs, loss_from=loss_from, token_fields=fields, pad_to_multiple=pad))
    return out


def _steps(n: int, batch_size: int, epochs: int, steps: int | None) -> int:
    return steps if steps is not None else max(1, epochs * (n // batch_size))


def run_sft(ctx) -> dict:
    cfg, S = ctx.cfg, ctx.cfg.sft
    d = cfg.data
    data = load_sft(d.train, ctx.tokenizer, max_len=d.max_len, chat_template=d.chat_template,
                    format=d.format)
    actor, layout = ctx.model("actor_train"), ctx.layout("actor_train")

    def step(s):
        local, _ = ctx.dp_share([data[i] for i in global_batch(len(data), S.batch_size, s, cfg.seed)],
                                "actor_train")
        mbs = sft_microbatches(local, ctx.max_tokens("actor_train"), ctx.sp_pad("actor_train"))
        return actor.trainer.step(mbs, sft_call(global_token_count(mbs, layout)))

    def evaluate(s):
        out = evaluate_pass_rate(ctx, "actor_train", s)
        if d.eval and not ctx.verifier:
            ev = load_sft(d.eval, ctx.tokenizer, max_len=d.max_len, chat_template=d.chat_template,
                          format=d.format)[:d.eval_samples]
            local, _ = ctx.dp_share(ev, "actor_train")
            mbs = sft_microbatches(local, ctx.max_tokens("actor_train"), ctx.sp_pad("actor_train"))
            n = global_token_count(mbs, layout)
            res = infer(actor.stage, mbs, lambda st, h, mb: sft_call(n)(st, h, mb)[0].detach())
            out = {"loss": global_sum(float(sum(res)), layout.dp_group)}
            ctx.log(s, out, phase="eval")
        return out

    return run_loop(ctx, _steps(len(data), S.batch_size, S.epochs, S.steps), step, desc="sft",
                    eval_fn=evaluate, show=("loss",))


def _load_pairs(ctx, path):
    d = ctx.cfg.data
    return load_pairs(path, ctx.tokenizer, max_len=d.max_len, format=d.format,
                      chat_template=d.chat_template, preference=d.preference,
                      safety_filter=d.safety_filter)


def pair_scores(ctx, call: str, pairs) -> torch.Tensor:
    """Reward-model scores [P, 2] (chosen, rejected) of this replica's pairs."""
    mbs = pair_microbatches(pairs, ctx.max_tokens(call), ctx.sp_pad(call))
    outs = infer(ctx.model(call).stage, mbs, scores_call())
    s = torch.cat([o[mb.seqs["real"].bool()] for o, mb in zip(outs, mbs)]).float()
    return s.view(-1, 2)


def run_rm(ctx) -> dict:
    cfg, R = ctx.cfg, ctx.cfg.rm
    data = _load_pairs(ctx, cfg.data.train)
    rm, layout = ctx.model("rm_train"), ctx.layout("rm_train")

    def step(s):
        batch = [data[i] for i in global_batch(len(data), R.batch_size, s, cfg.seed)]
        local, _ = ctx.dp_share(batch, "rm_train")
        mbs = pair_microbatches(local, ctx.max_tokens("rm_train"), ctx.sp_pad("rm_train"))
        return rm.trainer.step(mbs, reward_model_call(float(len(batch))))

    def evaluate(s):
        if not cfg.data.eval:
            return {}
        local, _ = ctx.dp_share(_load_pairs(ctx, cfg.data.eval)[:cfg.data.eval_samples], "rm_train")
        sc = pair_scores(ctx, "rm_train", local)
        out = global_means({"accuracy": (float((sc[:, 0] > sc[:, 1]).sum()), float(len(sc))),
                            "margin": (float((sc[:, 0] - sc[:, 1]).sum()), float(len(sc)))},
                           layout.dp_group, ctx.device)
        ctx.log(s, out, phase="eval")
        return out

    return run_loop(ctx, _steps(len(data), R.batch_size, R.epochs, None), step, desc="rm",
                    eval_fn=evaluate, show=("loss", "accuracy"))
