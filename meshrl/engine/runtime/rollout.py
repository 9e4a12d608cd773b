"""Rollouts: sample responses, score them, and run inference calls over them — each call on its own
layout's data-parallel shares (``RunContext.run_sharded``), the results gathered to every rank in
the global order, so any call can consume any other call's output."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from meshrl.engine.algorithms.calls import logprobs_call, scores_call, values_call
from meshrl.engine.batch import PackedBatch, pack, split_by_tokens
from meshrl.engine.data.jsonl import DataError
from meshrl.engine.dataflow import REW_INF
from meshrl.engine.generation import generator
from meshrl.engine.generation.sampling import SamplingParams
from meshrl.engine.train import infer

from .executor import Job


@dataclass
class Rollout:
    """The global batch of sampled sequences, identical on every rank."""

    prompts: list[list[int]]
    responses: list[list[int]]
    gen_logprobs: list[list[float]]
    finish: list[str]
    records: list[dict]
    scores: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    # per response token, the policy version (iterations trained) whose weights sampled it
    versions: list[list[int]] | None = None

    def __len__(self):
        return len(self.prompts)

    @property
    def ended(self) -> torch.Tensor:
        return torch.tensor([f != "length" for f in self.finish])

    def select(self, idx: list[int]) -> "Rollout":
        """The sequences ``idx`` (scores included), in that order."""
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return Rollout(pick(self.prompts), pick(self.responses), pick(self.gen_logprobs),
                       pick(self.finish), pick(self.records),
                       None if self.scores is None else self.scores[idx],
                       versions=None if self.versions is None else pick(self.versions))

    @staticmethod
    def concat(parts: list["Rollout"]) -> "Rollout":
        cat = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
        scores = [p.scores for p in parts]
        return Rollout(cat("prompts"), cat("responses"), cat("gen_logprobs"), cat("finish"),
                       cat("records"), None if any(s is None for s in scores) else
                       torch.cat(scores) if scores else torch.zeros(0),
                       versions=None if any(p.versions is None for p in parts) else cat("versions"))

    def state(self) -> dict:
        """The sampled batch as JSON data (a checkpoint's host state keeps batches sampled ahead)."""
        return {"prompts": self.prompts, "responses": self.responses,
                "gen_logprobs": self.gen_logprobs, "finish": self.finish, "records": self.records,
                "scores": None if self.scores is None else self.scores.tolist(),
                "versions": self.versions}

    @staticmethod
    def from_state(d: dict) -> "Rollout":
        return Rollout(d["prompts"], d["responses"], d["gen_logprobs"], d["finish"], d["records"],
                       None if d["scores"] is None else torch.tensor(d["scores"], dtype=torch.float32),
                       versions=d["versions"])


def sampling_params(gen_cfg, eos_ids, seed: int, iteration: int, *, greedy=False,
                    draw: int = 0) -> SamplingParams:
    """Each iteration (and each extra ``draw`` of dynamic sampling within it) draws fresh noise:
    the seed mixes the run seed, the iteration and the draw."""
    return SamplingParams(max_new_tokens=gen_cfg.max_new_tokens,
                          min_new_tokens=gen_cfg.min_new_tokens, greedy=greedy,
                          temperature=gen_cfg.temperature, top_k=gen_cfg.top_k,
                          top_p=gen_cfg.top_p, eos_ids=list(eos_ids),
                          seed=(seed * 1_000_003 + iteration * 7919 + draw * 104_729) % (2**31 - 1))


def sample(ctx, call: str, prompts: list, params: SamplingParams, *, k: int = 1,
           version: int = 0) -> Rollout:
    """``k`` responses per prompt (copies adjacent) from the call's model, whose weights are the
    policy's ``version``. Sequence ids for the sampling noise are global (prompt index × k + copy),
    so the draw does not depend on layouts."""
    ctx.executor.prepare(call)
    return sample_now(ctx, *sample_job(ctx, call, prompts, params, k=k, version=version))


def sample_now(ctx, job, finish) -> Rollout:
    """A `sample_job` run at once (in the foreground) on its layout as it stands."""
    return finish(ctx.executor.run_sharded_many([job])[0])


def sample_job(ctx, call: str, prompts: list, params: SamplingParams, *, k: int = 1, version: int = 0):
    """`sample` as a job on the call's layout as it stands (run it, or launch it in the
    background), and the function that makes its gathered result the Rollout."""
    batch = ctx.cfg.generation.batch_size

    def fn(stage, local, first):
        if not local and stage.layout.ep_size == 1:  # a replica with no prompts this time (under
            return []  # ep it still steps with its group: generate takes no prompts)
        engine = ctx.cfg.generation.engine
        # one call for the replica's prompts: the fast engine refills a slot as its sequence
        # finishes, and a prompt's k samples share its prefill; the reference engine decodes
        # static batches of `batch` sequences
        with generator(stage, None if engine == "auto" else engine) as gen:
            r = gen([p.prompt_ids for p in local], params, seq_offset=first * k, device=ctx.device,
                    samples=k, slots=batch, on_progress=ctx.watchdog.mark)
        out = list(zip(r.output_ids, r.logprobs, r.finish_reason))
        return [out[i * k:(i + 1) * k] for i in range(len(local))]

    def finish(per_prompt) -> Rollout:
        samples = [s for group in per_prompt for s in group]
        return Rollout([p.prompt_ids for p in prompts for _ in range(k)], [s[0] for s in samples],
                       [s[1] for s in samples], [s[2] for s in samples],
                       [p.record for p in prompts for _ in range(k)],
                       versions=[[version] * len(s[0]) for s in samples])

    return Job(call, prompts, fn), finish


def dump(ctx, step: int, roll: Rollout):
    """Rank 0 writes the first ``logging.dump_rollouts`` samples of a step (ids, prompt and
    completion text, score)."""
    n = ctx.cfg.logging.dump_rollouts
    if not n or not ctx.main:
        return
    from meshrl.engine.data.jsonl import write_jsonl
    rows = [{"prompt_ids": roll.prompts[i], "output_ids": roll.responses[i],
             "prompt": ctx.tokenizer.decode(roll.prompts[i], skip_special_tokens=True),
             "completion": ctx.tokenizer.decode(roll.responses[i], skip_special_tokens=True),
             "finish_reason": roll.finish[i],
             "score": None if roll.scores is None else float(roll.scores[i])}
            for i in range(min(n, len(roll)))]
    write_jsonl(os.path.join(ctx.cfg.run_dir, "rollouts", f"step_{step}.jsonl"), rows)


def score(ctx, call: str, roll: Rollout) -> torch.Tensor:
    """Scores [B] from the verifier (host work, on the call's replicas) or the reward model."""
    idx = list(range(len(roll)))
    if ctx.verifier is not None:
        def fn(stage, local, first):
            texts = [ctx.tokenizer.decode(roll.responses[i], skip_special_tokens=True) for i in local]
            return [float(s) for s in ctx.verifier([roll.records[i] for i in local], texts)]
        job = Job(call, idx, fn, reporter_only=True, timer=REW_INF)
    else:
        ctx.executor.prepare(REW_INF)
        x = ctx.executor
        mt, pad = x.max_tokens(REW_INF), x.sp_pad(REW_INF)

        def fn(stage, local, first):
            mbs = microbatches(roll, local, mt, pad_to_multiple=pad)
            outs = infer(stage, mbs, scores_call())
            return torch.cat([o[mb.seqs["real"].bool()] for o, mb in zip(outs, mbs)]).tolist()
        job = Job(REW_INF, idx, fn)
    scores = ctx.executor.run_sharded_many([job])[0]
    out = torch.tensor(scores, dtype=torch.float32)
    r = ctx.cfg.reward  # name the source as configured, e.g. reward.verifier=pkg.mod:fn
    check_scores(out, f"reward.verifier={r.verifier}" if ctx.verifier is not None
                 else f"reward.model={r.model}")
    return out


def check_scores(scores: torch.Tensor, where: str):
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).nonzero()[0])
        raise DataError(f"{where}: reward of sample {bad} is {scores[bad].item()}: the reward "
                        "source produced a non-finite value")


def pack_rollout(roll: Rollout, idx: list[int], token_fields: dict | None = None,
                 pad_to_multiple: int = 1) -> PackedBatch:
    """Pack the chosen sequences; ``action_mask`` marks the positions that score response tokens.
    ``token_fields`` map to per-sequence lists (indexed like ``roll``) of per-action values."""
    seqs = [roll.prompts[i] + roll.responses[i] for i in idx]
    loss_from = [len(roll.prompts[i]) - 1 for i in idx]
    fields = {name: [[0.0] * (len(roll.prompts[i]) - 1) + list(per_seq[i]) + [0.0] for i in idx]
              for name, per_seq in (token_fields or {}).items()}
    mb = pack(seqs, loss_from=loss_from, token_fields=fields, pad_to_multiple=pad_to_multiple)
    # a ``counted`` field (1 or 0 per action) leaves responses out of the losses (overlong filter)
    mb.tokens["action_mask"] = mb.tokens["loss_mask"] * mb.tokens.get("counted", 1.0)
    return mb


def microbatches(roll: Rollout, idx: list[int], max_tokens: int, token_fields=None,
                 pad_to_multiple: int = 1) -> list[PackedBatch]:
    lengths = [len(roll.prompts[i]) + len(roll.responses[i]) for i in idx]
    return [pack_rollout(roll, [idx[j] for j in group], token_fields, pad_to_multiple)
            for group in split_by_tokens(lengths, max_tokens)]


def _cut_actions(roll, idx, mbs, outs, *, with_last=False):
    """Per-position outputs back into each sequence's action values (and its last-token value)."""
    res, j = [], 0
    for mb, vals in zip(mbs, outs):
        cu = mb.meta.cu_seqlens.tolist()
        for b in range(int(mb.seqs["real"].sum())):
            i = idx[j]
            p, r = len(roll.prompts[i]), len(roll.responses[i])
            acts = vals[cu[b] + p - 1:cu[b] + p - 1 + r].tolist()
            res.append((acts, float(vals[cu[b + 1] - 1])) if with_last else acts)
            j += 1
    return res


def per_action_job(ctx, call: str, roll: Rollout, fn_call, *, with_last=False, timer=None):
    """An inference call over every sequence, as a job for ``RunContext.run_sharded_many``: its
    result is per-sequence lists of per-action outputs (and, ``with_last``, the last token's)."""
    ctx.executor.prepare(call)
    mt, pad = ctx.executor.max_tokens(call), ctx.executor.sp_pad(call)

    def fn(stage, local, first):
        mbs = microbatches(roll, local, mt, pad_to_multiple=pad)
        return _cut_actions(roll, local, mbs, infer(stage, mbs, fn_call), with_last=with_last)

    return Job(call, list(range(len(roll))), fn, timer=timer)


def logprobs_job(ctx, call, roll, temperature: float, timer=None):
    return per_action_job(ctx, call, roll, logprobs_call(temperature), timer=timer)


def values_job(ctx, call, roll, timer=None):
    return per_action_job(ctx, call, roll, values_call(), with_last=True, timer=timer)


def split_values(out) -> tuple[list[list[float]], torch.Tensor]:
    """A values job's result -> per-action values and each sequence's value after its last token."""
    return [o[0] for o in out], torch.tensor([o[1] for o in out])


def flatten(per_seq: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence action lists -> (flat [N_actions] fp32, cu_seqlens int32 [B+1])."""
    lengths = [len(x) for x in per_seq]
    cu = torch.zeros(len(per_seq) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return torch.tensor([v for x in per_seq for v in x], dtype=torch.float32), cu


def unflatten(flat: torch.Tensor, cu: torch.Tensor) -> list[list[float]]:
    c = cu.tolist()
    return [flat[c[i]:c[i + 1]].tolist() for i in range(len(c) - 1)]
