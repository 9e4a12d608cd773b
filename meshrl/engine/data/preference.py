"""Preference pairs from JSONL as token ids: plain pairs, HH-RLHF dialogues, SafeRLHF records.

Formats (`format="auto"` reads the first record's keys):
- "pairs": `prompt`, `chosen`, `rejected`, the last two responses only.
- "hh": `chosen` and `rejected` full dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ..."). The prompt is the
  text up to and including the last "\\n\\nAssistant:" and must be the same in both; the responses are
  the rest. Without a chat template a response keeps its leading space and is tokenized as the
  continuation of the prompt (datasets.py says how), so prompt + response is exactly the dialogue; with a
  chat template the prompt's turns become chat messages and the response loses that one space, which
  the template's own separator replaces.
- "saferlhf": `prompt`, `response_0`, `response_1`, `better_response_id`, `safer_response_id`,
  `is_response_0_safe`, `is_response_1_safe`. `preference="better"` orders the pair by helpfulness,
  `"safer"` by harmlessness; `safety_filter="dual_unsafe"` drops pairs whose responses are both unsafe,
  `"dual_safe"` those whose responses are both safe (SafeRLHF's convention). Dropped pairs are
  counted in the report under the filter's name.

Tokenization, EOS, `vocab_size` and `too_long` follow datasets.py; `max_len` bounds prompt + chosen and
prompt + rejected. A pair whose chosen and rejected ids are identical carries no preference (its DPO
and Bradley-Terry gradients vanish), so it is skipped and counted as "identical" rather than failing a
corpus over a few duplicates.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .datasets import (Encoder, Examples, Located, check_choice, check_reward, check_too_long, read_records, split_hh,
                       text_field)
from .jsonl import DataError, require

PAIR_FORMATS = ("auto", "pairs", "hh", "saferlhf")
PREFERENCES = ("better", "safer")
SAFETY_FILTERS = (None, "dual_unsafe", "dual_safe")


@dataclass(frozen=True)
class PairExample(Located):
    lineno: int
    prompt_ids: list[int]
    chosen_ids: list[int]  # ends with EOS
    rejected_ids: list[int]  # ends with EOS
    record: dict
    source: str = ""


@dataclass(frozen=True)
class _PairText:
    prompt: str
    chosen: str
    rejected: str
    fields: tuple[str, str, str]  # where prompt, chosen and rejected came from, for error messages
    hh: bool = False


def detect_pair_format(rec: dict, where: str) -> str:
    if "response_0" in rec and "response_1" in rec:
        return "saferlhf"
    if "chosen" in rec and "rejected" in rec:
        return "pairs" if "prompt" in rec else "hh"
    raise DataError(f"{where}: cannot tell the pair format from fields {sorted(rec)[:8]}: give 'prompt', "
                    "'chosen' and 'rejected', HH 'chosen'/'rejected' dialogues, or SafeRLHF 'response_0'/"
                    "'response_1', or pass format=")


def _hh_text(rec: dict, where: str) -> _PairText:
    prompt, chosen = split_hh(require(rec, "chosen", where, str), where, "chosen")
    other, rejected = split_hh(require(rec, "rejected", where, str), where, "rejected")
    if prompt != other:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' differ before their last "
                        "'\\n\\nAssistant:': an HH pair must share the dialogue up to the final response")
    return _PairText(prompt, chosen, rejected, ("chosen", "chosen", "rejected"), hh=True)


def _binary_id(rec: dict, name: str, where: str) -> int:
    value = require(rec, name, where)
    if isinstance(value, bool) or value not in (0, 1):
        raise DataError(f"{where}: field '{name}' must be 0 or 1, got {value!r}")
    return int(value)


def _saferlhf_text(rec: dict, where: str, preference: str, safety_filter: str | None) -> _PairText | None:
    """The ordered pair, or None when the safety filter drops it."""
    prompt = text_field(rec, "prompt", where, "prompt")
    responses = [text_field(rec, f"response_{i}", where, "response") for i in (0, 1)]
    best = _binary_id(rec, f"{preference}_response_id", where)
    if safety_filter is not None:
        safe = [require(rec, f"is_response_{i}_safe", where, bool) for i in (0, 1)]
        if (safety_filter == "dual_unsafe" and not any(safe)) or (safety_filter == "dual_safe" and all(safe)):
            return None
    return _PairText(prompt, responses[best], responses[1 - best],
                     ("prompt", f"response_{best}", f"response_{1 - best}"))


def _pair_text(rec: dict, where: str, fmt: str, preference: str, safety_filter: str | None):
    if fmt == "hh":
        return _hh_text(rec, where)
    if fmt == "saferlhf":
        return _saferlhf_text(rec, where, preference, safety_filter)
    return _PairText(text_field(rec, "prompt", where, "prompt"), text_field(rec, "chosen", where, "response"),
                     text_field(rec, "rejected", where, "response"), ("prompt", "chosen", "rejected"))


def load_pairs(path, tokenizer, *, max_len: int, format: str = "auto", chat_template: bool = False,
               preference: str = "better", safety_filter: str | None = None, vocab_size: int | None = None,
               too_long: str = "error") -> Examples:
    """PairExamples of a JSONL file, with `.report` counting what was read and dropped (by "identical",
    "too_long", "dual_unsafe" or "dual_safe"). The module docstring describes the formats."""
    check_choice("format", format, PAIR_FORMATS)
    check_choice("preference", preference, PREFERENCES)
    check_choice("safety_filter", safety_filter, SAFETY_FILTERS)
    check_choice("too_long", too_long, ("error", "skip"))
    enc = Encoder(tokenizer, chat_template=chat_template, vocab_size=vocab_size, responses=True)
    records, report = read_records(path)
    fmt = detect_pair_format(records[0][1], f"{path}:{records[0][0]}") if format == "auto" else format
    if safety_filter is not None and fmt != "saferlhf":
        raise ValueError(f"safety_filter={safety_filter!r} needs SafeRLHF records, but {path} is "
                         f"format {fmt!r}")
    out = Examples(report=report)
    for lineno, rec in records:
        where = f"{path}:{lineno}"
        text = _pair_text(rec, where, fmt, preference, safety_filter)
        if text is None:
            report.drop(safety_filter)
            continue
        pname, cname, rname = text.fields
        prompt_ids = enc.prompt(text.prompt, where, pname, hh=text.hh)
        chosen_ids = enc.response(text.prompt, prompt_ids, text.chosen, where, cname, hh=text.hh)
        rejected_ids = enc.response(text.prompt, prompt_ids, text.rejected, where, rname, hh=text.hh)
        if chosen_ids == rejected_ids:
            report.drop("identical")
            continue
        # A prompt that leaves no room for a response is the prompt's fault, not a response's;
        # all() stops at the first member that is too long, so a skipped pair is counted once.
        n_prompt = len(prompt_ids)
        lengths = [(n_prompt + 1, pname, "the prompt with one response token")]
        lengths += [(n_prompt + len(ids), name, f"prompt + {name} ({n_prompt} + {len(ids)})")
                    for name, ids in ((cname, chosen_ids), (rname, rejected_ids))]
        if all(check_too_long(n, max_len, report, too_long, where, name, what, "max_len")
               for n, name, what in lengths):
            out.append(PairExample(lineno, prompt_ids, chosen_ids, rejected_ids, rec, str(path)))
    return out


def filter_pairs_by_margin(pairs: Sequence[PairExample], margins, min_margin: float
                           ) -> tuple[list[PairExample], int]:
    """(pairs whose reward-model margin r(chosen) - r(rejected) is at least `min_margin`, number dropped).

    `margins` is a sequence or tensor with one value per pair; a NaN or inf margin is a DataError naming
    the pair's file and line rather than a silent drop, since it means the reward model is broken.
    """
    values = margins.reshape(-1).tolist() if hasattr(margins, "reshape") else list(margins)
    if len(values) != len(pairs):
        raise ValueError(f"filter_pairs_by_margin: {len(pairs)} pairs but {len(values)} margins")
    check_reward(values, [p.where for p in pairs], what="reward margin")
    kept = [p for p, m in zip(pairs, values) if m >= min_margin]
    return kept, len(pairs) - len(kept)


__all__ = ["PairExample", "detect_pair_format", "filter_pairs_by_margin", "load_pairs"]
