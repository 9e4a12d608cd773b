"""Training data from JSONL or Parquet: prompts, SFT examples and code tasks as token ids, and a check on
rewards. Files are read by `records.read_data`.

Preference pairs (plain, HH-RLHF, SafeRLHF) live in `preference.py` and share the helpers here.

Every loader keeps each record's 1-based line number (for Parquet a `Row`, which prints "row N"), its
file and the original dict (verifiers read pass-through fields such as `answer`), and turns each input
problem into a one-line `DataError` naming file, line (or row) and field. Ids are plain lists of ints;
the runtime packs them.

Tokenization:
- A prompt goes through `encode_prompt` (BOS as the tokenizer adds it) or, with `chat_template=True`,
  through the tokenizer's chat template as a user turn followed by the generation prompt.
- Without a chat template a response continues its prompt: its ids are the tail of
  tokenize(prompt + response) whenever the prompt's own ids are a prefix of that, so a response splits
  the way the model sees it in running text (HH's " Sure" after "Assistant:" stays one byte-level BPE
  token, and SentencePiece adds no second "▁"). Where a merge crosses the boundary the response is
  tokenized alone. With a chat template the response is tokenized alone.
- Responses end with `tokenizer.eos_token_id`, appended unless the text already ends with it (a
  record such as "15</s>" is not given two).
- `vocab_size` (the model's vocabulary) bounds every id when given; given `input_ids` are bounded by it
  or, without it, by `len(tokenizer)`.
- `too_long="error"` (default) fails on the first sequence over the limit; `"skip"` drops it and counts
  it in the report, for corpora such as HH-RLHF where a few dialogues exceed any short context.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from meshrl.engine.tasks.code import parse_tests

from .jsonl import DataError, require
from .records import read_data
from .tokenizer import encode_prompt

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class Located:
    """``where`` = "file:line" of an example, for one-line errors raised after loading."""

    @property
    def where(self) -> str:
        return f"{self.source}:{self.lineno}"


@dataclass(frozen=True)
class PromptExample(Located):
    lineno: int
    prompt_ids: list[int]
    record: dict
    source: str = ""  # the file, so that later errors (a NaN reward) can still name file and line


@dataclass(frozen=True)
class SFTExample(Located):
    lineno: int
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS
    record: dict
    source: str = ""


@dataclass(frozen=True)
class CodeTask(Located):
    lineno: int
    question: str
    input_output: dict  # {"inputs": [...], "outputs": [...]} plus "fn_name" when the record has one
    record: dict
    source: str = ""


@dataclass
class LoadReport:
    """What a loader read and what it dropped, by reason ("too_long", "identical", "dual_unsafe", ...)."""
    path: str
    read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return self.read - sum(self.dropped.values())

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def summary(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items()))
        return f"{self.path}: kept {self.kept} of {self.read} records" + (f" (dropped {why})" if why else "")


class Examples(list):
    """The examples of one file: a plain list that also carries the file's LoadReport as `.report`."""

    def __init__(self, items=(), report: LoadReport | None = None):
        super().__init__(items)
        self.report = report if report is not None else LoadReport("")


def read_records(path) -> tuple[list[tuple[int, dict]], LoadReport]:
    records = read_data(path)
    if not records:
        raise DataError(f"{path}: no records: the file is empty")
    return records, LoadReport(str(path), read=len(records))


def text_field(rec: dict, name: str, where: str, what: str = "text") -> str:
    """rec[name] as a non-blank string; a blank one is an error (an empty prompt or response)."""
    value = require(rec, name, where, str)
    if not value.strip():
        raise DataError(f"{where}: field '{name}' is empty: give the {what}")
    return value


def check_too_long(n: int, limit: int, report: LoadReport, too_long: str, where: str, name: str,
                   what: str, knob: str) -> bool:
    """True when n tokens fit; False (counted) to skip; a DataError under too_long="error"."""
    if n <= limit:
        return True
    if too_long == "skip":
        report.drop("too_long")
        return False
    raise DataError(f"{where}: field '{name}': {what} has {n} tokens, longer than the context limit {limit}: "
                    f"shorten it or raise {knob}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def split_hh(dialogue: str, where: str, name: str) -> tuple[str, str]:
    """(prompt, response) of an HH dialogue: the prompt runs to the end of the last "\\n\\nAssistant:"
    and the response is the rest, its leading space kept so that prompt + response is the dialogue."""
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut == -1:
        raise DataError(f"{where}: field '{name}' has no '\\n\\nAssistant:' turn: HH dialogues read "
                        "'\\n\\nHuman: ...\\n\\nAssistant: ...'")
    prompt, response = dialogue[:cut + len(HH_ASSISTANT)], dialogue[cut + len(HH_ASSISTANT):]
    if "\n\nHuman:" in response:
        raise DataError(f"{where}: field '{name}' ends with a Human turn: the last turn must be the "
                        "Assistant's")
    if not response.strip():
        raise DataError(f"{where}: field '{name}' is empty after the last '\\n\\nAssistant:': "
                        "give the response")
    return prompt, response


def hh_messages(prompt: str, where: str, name: str) -> list[dict]:
    """Chat messages of an HH prompt (which ends with the empty Assistant turn the response fills)."""
    parts = _HH_TURN.split(prompt)
    if parts[0].strip():
        raise DataError(f"{where}: field '{name}' has text before its first '\\n\\nHuman:' turn")
    turns = list(zip(parts[1::2], parts[2::2]))[:-1]
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in turns]


class Encoder:
    """Tokenizes prompts and responses the way the module docstring describes, with errors per field."""

    def __init__(self, tokenizer, *, chat_template: bool = False, vocab_size: int | None = None,
                 responses: bool = False):
        self.tok, self.chat, self.vocab_size = tokenizer, chat_template, vocab_size
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True: this tokenizer has no chat template")
        self.eos = getattr(tokenizer, "eos_token_id", None)
        if responses and self.eos is None:
            raise ValueError("this tokenizer has no EOS token, and responses must end with one")

    def _encode(self, where: str, name: str, fn, *args, **kwargs) -> list[int]:
        if self.tok is None:
            raise DataError(f"{where}: field '{name}' is text but no tokenizer was given (give input_ids)")
        try:
            ids = fn(*args, **kwargs)
        except (ValueError, KeyError, TypeError) as e:  # e.g. a character CharTokenizer lacks
            raise DataError(f"{where}: field '{name}': cannot tokenize: {' '.join(str(e).split())}") from None
        if isinstance(ids, Mapping):  # apply_chat_template's BatchEncoding (a UserDict, not a dict)
            ids = ids["input_ids"]
        return self.in_range([int(t) for t in ids], where, name, self.vocab_size)

    def _chat(self, messages: list[dict]) -> list[int]:
        from jinja2 import TemplateError  # transformers renders chat templates with jinja2
        try:
            return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except TemplateError as e:  # e.g. a template that insists on alternating user/assistant turns
            raise ValueError(f"chat template: {e}") from None

    def messages(self, messages, where: str, name: str) -> list[int]:
        """A prompt given as chat messages ([{"role", "content"}], as verl's data files hold it):
        rendered with the tokenizer's chat template and its generation prompt, whatever
        ``chat_template`` says (messages mean nothing as plain text)."""
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in messages) or not messages:
            raise DataError(f"{where}: field '{name}' is a list, so it must be chat messages, each "
                            '{"role": ..., "content": ...} with text values')
        if self.tok is None or not getattr(self.tok, "chat_template", None):
            raise DataError(f"{where}: field '{name}' holds chat messages but the tokenizer has no chat "
                            "template to render them: give text prompts, or a tokenizer with a template")
        return self._encode(where, name, self._chat, [{"role": m["role"], "content": m["content"]}
                                                      for m in messages])

    def prompt(self, text: str, where: str, name: str, *, hh: bool = False) -> list[int]:
        if not self.chat:
            return self._encode(where, name, encode_prompt, self.tok, text)
        messages = hh_messages(text, where, name) if hh else [{"role": "user", "content": text}]
        return self._encode(where, name, self._chat, messages)

    def response(self, prompt_text: str, prompt_ids: list[int], text: str, where: str, name: str, *,
                 hh: bool = False) -> list[int]:
        if self.chat:
            # The template separates the turns, so HH's space after "Assistant:" is not part of the reply.
            ids = self._encode(where, name, self.tok.encode, text.removeprefix(" ") if hh else text,
                               add_special_tokens=False)
        else:
            full = self._encode(where, name, self.tok.encode, prompt_text + text, add_special_tokens=True)
            n = len(prompt_ids)
            ids = full[n:] if full[:n] == prompt_ids and len(full) > n else \
                self._encode(where, name, self.tok.encode, text, add_special_tokens=False)
        if not ids or ids[-1] != self.eos:
            ids.append(self.eos)
        return ids

    def given_ids(self, ids, where: str, name: str) -> list[int]:
        """Pre-tokenized ids from a record, checked against the vocabulary."""
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in ids):
            raise DataError(f"{where}: field '{name}' must be a non-empty list of ints")
        bound = self.vocab_size if self.vocab_size is not None else (len(self.tok) if self.tok is not None
                                                                     else None)
        return self.in_range(list(ids), where, name, bound)

    @staticmethod
    def in_range(ids: list[int], where: str, name: str, bound: int | None) -> list[int]:
        if ids and (min(ids) < 0 or (bound is not None and max(ids) >= bound)):
            bad = next(t for t in ids if t < 0 or (bound is not None and t >= bound))
            raise DataError(f"{where}: field '{name}' has id {bad} outside the vocabulary of {bound}: "
                            "check the tokenizer matches the model")
        return ids


def load_prompts(path, tokenizer, *, max_prompt_len: int, chat_template: bool = False,
                 prompt_field: str = "prompt", vocab_size: int | None = None,
                 too_long: str = "error") -> Examples:
    """PromptExamples of a JSONL or Parquet file whose records hold `prompt` text (or `prompt_field`,
    e.g. "question" for code tasks), a list of chat messages there (rendered with the tokenizer's
    chat template), or pre-tokenized `input_ids`, which win when present and are used as is."""
    check_choice("too_long", too_long, ("error", "skip"))
    enc = Encoder(tokenizer, chat_template=chat_template, vocab_size=vocab_size)
    records, report = read_records(path)
    out = Examples(report=report)
    for lineno, rec in records:
        where = f"{path}:{lineno}"
        if rec.get("input_ids") is not None:
            name, ids = "input_ids", enc.given_ids(rec["input_ids"], where, "input_ids")
        else:
            if rec.get(prompt_field) is None:
                raise DataError(f"{where}: missing field '{prompt_field}' (or 'input_ids')")
            name = prompt_field
            if isinstance(rec[prompt_field], list):
                ids = enc.messages(rec[prompt_field], where, prompt_field)
            else:
                ids = enc.prompt(text_field(rec, prompt_field, where, "prompt"), where, prompt_field)
        if check_too_long(len(ids), max_prompt_len, report, too_long, where, name, "prompt",
                          "max_prompt_len"):
            out.append(PromptExample(lineno, ids, rec, str(path)))
    return out


SFT_FORMATS = ("auto", "sft", "hh", "pairs")


def detect_sft_format(rec: dict, where: str) -> str:
    if "response" in rec or "completion" in rec:
        return "sft"
    if "chosen" in rec:
        return "pairs" if "prompt" in rec else "hh"
    raise DataError(f"{where}: cannot tell the SFT format from fields {sorted(rec)[:8]}: give 'prompt' and "
                    "'response' (or 'completion'), or an HH 'chosen' dialogue, or pass format=")


def _sft_texts(rec: dict, where: str, fmt: str) -> tuple[str, str, str, str, bool]:
    """(prompt, response, prompt field, response field, is HH) of one SFT record."""
    if fmt == "hh":
        prompt, response = split_hh(require(rec, "chosen", where, str), where, "chosen")
        return prompt, response, "chosen", "chosen", True
    name = "chosen" if fmt == "pairs" else ("response" if "response" in rec or "completion" not in rec
                                            else "completion")
    if fmt == "sft" and rec.get(name) is None:
        raise DataError(f"{where}: missing field 'response' (or 'completion')")
    prompt = text_field(rec, "prompt", where, "prompt")
    return prompt, text_field(rec, name, where, "response"), "prompt", name, False


def load_sft(path, tokenizer, *, max_len: int, chat_template: bool = False, format: str = "auto",
             vocab_size: int | None = None, too_long: str = "error") -> Examples:
    """SFTExamples: `prompt` + `response` (or `completion`) lines ("sft"), HH-RLHF `chosen` dialogues
    trained on their last Assistant turn ("hh"), or `prompt` + `chosen` pairs ("pairs"); "auto" reads
    the format off the first record. `max_len` bounds prompt + response."""
    check_choice("format", format, SFT_FORMATS)
    check_choice("too_long", too_long, ("error", "skip"))
    enc = Encoder(tokenizer, chat_template=chat_template, vocab_size=vocab_size, responses=True)
    records, report = read_records(path)
    fmt = detect_sft_format(records[0][1], f"{path}:{records[0][0]}") if format == "auto" else format
    out = Examples(report=report)
    for lineno, rec in records:
        where = f"{path}:{lineno}"
        prompt, response, pname, rname, hh = _sft_texts(rec, where, fmt)
        prompt_ids = enc.prompt(prompt, where, pname, hh=hh)
        response_ids = enc.response(prompt, prompt_ids, response, where, rname, hh=hh)
        if check_too_long(len(prompt_ids) + len(response_ids), max_len, report, too_long, where, rname,
                          "prompt + response", "max_len"):
            out.append(SFTExample(lineno, prompt_ids, response_ids, rec, str(path)))
    return out


def _check_test_values(io: dict, where: str) -> None:
    """Stdin tests need text; finding a bad one here beats the verifier failing mid-run."""
    if io.get("fn_name") is not None and not isinstance(io["fn_name"], str):
        raise DataError(f"{where}: field 'input_output': 'fn_name' must be a string")
    if io.get("fn_name"):
        return
    for key in ("inputs", "outputs"):
        for i, v in enumerate(io[key]):
            if not (isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))):
                raise DataError(f"{where}: field 'input_output': {key}[{i}] must be a string or a list of "
                                f"lines for a stdin test, got {type(v).__name__}")


def load_code_tasks(path) -> Examples:
    """CodeTasks of an APPS-style JSONL file (`question`, `input_output` as a dict or its JSON string),
    parsed by the code verifier's own `parse_tests` so that loading and scoring agree."""
    records, report = read_records(path)
    out = Examples(report=report)
    for lineno, rec in records:
        where = f"{path}:{lineno}"
        question = text_field(rec, "question", where, "question")
        require(rec, "input_output", where)
        io = rec["input_output"]
        try:
            inputs, outputs, fn_name = parse_tests(rec)
        except ValueError as e:
            raise DataError(f"{where}: {str(e).removeprefix('code task: ')}") from None
        _check_test_values(io if isinstance(io, dict) else json.loads(io), where)
        parsed = {"inputs": inputs, "outputs": outputs, **({"fn_name": fn_name} if fn_name else {})}
        out.append(CodeTask(lineno, question, parsed, rec, str(path)))
    return out


def _where_at(where, i: int, many: bool) -> str:
    if isinstance(where, str):
        return f"{where}[{i}]" if many else where
    return str(where[i])


def check_reward(value, where: str | Sequence[str], *, what: str = "reward"):
    """A reward (or margin) as a float when it is a finite scalar; a tensor, array or sequence is checked
    element by element and returned unchanged. A NaN, an inf or a non-number is a one-line DataError
    naming `where`: one string (element i is named "where[i]") or one string per element (such as
    each example's `where`)."""
    if hasattr(value, "reshape") and hasattr(value, "tolist"):
        flat, many = value.reshape(-1).tolist(), getattr(value, "ndim", 1) > 0
    elif isinstance(value, (list, tuple)):
        flat, many = list(value), True
    else:
        flat, many = [value], False
    if not isinstance(where, str) and len(where) != len(flat):
        raise ValueError(f"check_reward: {len(flat)} values but {len(where)} places")
    for i, v in enumerate(flat):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise DataError(f"{_where_at(where, i, many)}: {what} is {v!r}, not a number: check the reward "
                            "model or verifier that produced it") from None
        if not math.isfinite(f):
            raise DataError(f"{_where_at(where, i, many)}: {what} is {f}, not a finite number: check the "
                            "reward model or verifier that produced it")
    return value if many else float(flat[0])


__all__ = ["CodeTask", "DataError", "Encoder", "Examples", "LoadReport", "PromptExample", "SFTExample",
           "check_reward", "load_code_tasks", "load_prompts", "load_sft", "split_hh", "hh_messages"]
