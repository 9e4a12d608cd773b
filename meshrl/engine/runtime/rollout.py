"""Rollouts: sample responses for this data-parallel replica's prompts, score them, and pack
prompt+response sequences with per-position fields for the inference and training calls."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from meshrl.engine.algorithms.calls import logprobs_call, scores_call, values_call
from meshrl.engine.batch import PackedBatch, pack, split_by_tokens
from meshrl.engine.data.jsonl import DataError
from meshrl.engine.generate import generate
from meshrl.engine.sampling import SamplingParams
from meshrl.engine.train import infer


@dataclass
class Rollout:
    """B sampled sequences of one replica; ``prompt_index`` is each one's global prompt index."""

    prompts: list[list[int]]
    responses: list[list[int]]
    gen_logprobs: list[list[float]]
    finish: list[str]
    prompt_index: list[int]
    records: list[dict]
    scores: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.prompts)

    @property
    def ended(self) -> torch.Tensor:
        return torch.tensor([f != "length" for f in self.finish])

    def sequences(self) -> list[list[int]]:
        return [p + r for p, r in zip(self.prompts, self.responses)]

    def subset(self, idx: list[int]) -> "Rollout":
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        out = Rollout(pick(self.prompts), pick(self.responses), pick(self.gen_logprobs),
                      pick(self.finish), pick(self.prompt_index), pick(self.records))
        if self.scores is not None:
            out.scores = self.scores[idx]
        out.extra = {k: [v[i] for i in idx] for k, v in self.extra.items()}
        return out


def sample(stage, prompts: list[list[int]], records: list[dict], first_index: int,
           params: SamplingParams, *, samples_per_prompt: int = 1, batch_size: int = 256,
           device=None) -> Rollout:
    """Generate ``samples_per_prompt`` responses per prompt (copies adjacent). Sequence ids for the
    sampling noise are global (prompt index × samples + copy), so the draw is layout-independent."""
    k = samples_per_prompt
    flat = [p for p in prompts for _ in range(k)]
    out_ids, out_logp, finish = [], [], []
    for b in range(0, len(flat), batch_size):
        r = generate(stage, flat[b:b + batch_size], params, seq_offset=first_index * k + b,
                     device=device)
        out_ids += r.output_ids
        out_logp += r.logprobs
        finish += r.finish_reason
    idx = [first_index + i for i in range(len(prompts)) for _ in range(k)]
    recs = [records[i] for i in range(len(prompts)) for _ in range(k)]
    return Rollout(flat, out_ids, out_logp, finish, idx, recs)


def score_with_verifier(rollout: Rollout, verifier, tokenizer, layout) -> torch.Tensor:
    """Scores [B] from a verifier, computed once per model replica (its first rank) and shared:
    a code verifier runs sandboxes, which must not run tp·pp times over."""
    scores = None
    if layout.tp_rank == 0 and layout.pp_rank == 0:
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rollout.responses]
        scores = [float(s) for s in verifier(rollout.records, texts)]
    if layout.mp_group is not None:
        box = [scores]
        dist.broadcast_object_list(box, src=layout.rank_at(tp=0, dp=layout.dp_rank, pp=0),
                                   group=layout.mp_group)
        scores = box[0]
    out = torch.tensor(scores, dtype=torch.float32)
    check_scores(out, "verifier")
    return out


def check_scores(scores: torch.Tensor, where: str):
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).nonzero()[0])
        raise DataError(f"{where}: reward of sample {bad} is {scores[bad].item()}: the reward "
                        "source produced a non-finite value")


def pack_rollout(rollout: Rollout, idx: list[int], token_fields: dict | None = None,
                 pad_to_multiple: int = 1) -> PackedBatch:
    """Pack the chosen sequences; ``action_mask`` marks the positions that score response tokens.
    ``token_fields`` are per-sequence lists of per-action values (length = response length)."""
    seqs = [rollout.prompts[i] + rollout.responses[i] for i in idx]
    loss_from = [len(rollout.prompts[i]) - 1 for i in idx]
    fields = {}
    for name, per_seq in (token_fields or {}).items():
        fields[name] = [[0.0] * (len(rollout.prompts[i]) - 1) + list(per_seq[i]) + [0.0] for i in idx]
    mb = pack(seqs, loss_from=loss_from, token_fields=fields, pad_to_multiple=pad_to_multiple)
    mb.tokens["action_mask"] = mb.tokens["loss_mask"]
    return mb


def microbatches(rollout: Rollout, idx: list[int], max_tokens: int, token_fields=None,
                 pad_to_multiple: int = 1) -> list[PackedBatch]:
    lengths = [len(rollout.prompts[i]) + len(rollout.responses[i]) for i in idx]
    return [pack_rollout(rollout, [idx[j] for j in group], token_fields, pad_to_multiple)
            for group in split_by_tokens(lengths, max_tokens)]


def per_action(rollout: Rollout, idx: list[int], flat_outputs: list[torch.Tensor],
               mbs: list[PackedBatch]) -> list[list[float]]:
    """Cut per-position outputs of ``microbatches`` back into each sequence's action values."""
    out = []
    j = 0
    for mb, vals in zip(mbs, flat_outputs):
        starts = mb.meta.cu_seqlens[:-1].tolist()
        for s in starts[:int(mb.seqs["real"].sum())]:
            i = idx[j]
            p, r = len(rollout.prompts[i]), len(rollout.responses[i])
            out.append(vals[s + p - 1:s + p - 1 + r].tolist())
            j += 1
    return out


def action_values(stage, rollout: Rollout, fn, max_tokens: int, pad: int = 1):
    """Run an inference call on every sequence; return per-action lists (and raw outputs)."""
    idx = list(range(len(rollout)))
    mbs = microbatches(rollout, idx, max_tokens, pad_to_multiple=pad)
    outs = infer(stage, mbs, fn)
    return per_action(rollout, idx, outs, mbs), outs, mbs


def logprobs_of(stage, rollout, temperature, max_tokens, pad=1):
    return action_values(stage, rollout, logprobs_call(temperature), max_tokens, pad)[0]


def values_of(stage, rollout, max_tokens, pad=1):
    """Per-action values and each sequence's value after its last token (for bootstrapping)."""
    per, outs, mbs = action_values(stage, rollout, values_call(), max_tokens, pad)
    last = []
    for mb, vals in zip(mbs, outs):
        ends = (mb.meta.cu_seqlens[1:] - 1).tolist()[:int(mb.seqs["real"].sum())]
        last += [float(vals[e]) for e in ends]
    return per, torch.tensor(last)


def reward_model_scores(stage, rollout, max_tokens, pad=1) -> torch.Tensor:
    idx = list(range(len(rollout)))
    mbs = microbatches(rollout, idx, max_tokens, pad_to_multiple=pad)
    outs = infer(stage, mbs, scores_call())
    scores = torch.cat([o[:int(mb.seqs["real"].sum())] for o, mb in zip(outs, mbs)]).float()
    check_scores(scores, "reward model")
    return scores


def flatten(per_seq: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence action lists -> (flat [N_actions] fp32, cu_seqlens int32 [B+1])."""
    lengths = [len(x) for x in per_seq]
    cu = torch.zeros(len(per_seq) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return torch.tensor([v for x in per_seq for v in x], dtype=torch.float32), cu


def unflatten(flat: torch.Tensor, cu: torch.Tensor) -> list[list[float]]:
    c = cu.tolist()
    return [flat[c[i]:c[i + 1]].tolist() for i in range(len(c) - 1)]


def sampling_params(gen_cfg, eos_ids, seed: int, iteration: int, *, greedy=False) -> SamplingParams:
    """Each iteration draws fresh noise: the seed mixes the run seed and the iteration."""
    return SamplingParams(max_new_tokens=gen_cfg.max_new_tokens,
                          min_new_tokens=gen_cfg.min_new_tokens, greedy=greedy,
                          temperature=gen_cfg.temperature, top_k=gen_cfg.top_k,
                          top_p=gen_cfg.top_p, eos_ids=list(eos_ids),
                          seed=(seed * 1_000_003 + iteration * 7919) % (2**31 - 1))

