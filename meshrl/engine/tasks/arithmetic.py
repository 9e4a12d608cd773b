"""Multi-digit arithmetic: a verifiable task small enough to learn from scratch on a CPU.

Records are `{"prompt": "12+345=", "answer": "357"}`. Generation is a pure function of its arguments
(one `random.Random(seed)`), so a seed names a dataset. `score` checks the exact answer.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from .char_tokenizer import CharTokenizer

# Text a model may emit after its answer that is not part of it: the EOS/PAD strings of the bundled
# CharTokenizer and of common HF tokenizers (when decoding without skip_special_tokens).
_TRAILING_SPECIALS = ("</s>", "<pad>", "<s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<eos>")


def _number(rng: random.Random, digits: tuple[int, int]) -> int:
    n = rng.randint(digits[0], digits[1])
    if n == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (n - 1), 10**n - 1)


def make_problem(rng: random.Random, digits: tuple[int, int] = (1, 3), ops: Sequence[str] = ("+",),
                 allow_negative: bool = False) -> dict[str, str]:
    """One record; each operand's digit count is drawn uniformly from `digits` (inclusive)."""
    a, b = _number(rng, digits), _number(rng, digits)
    op = rng.choice(list(ops))
    if op == "+":
        value = a + b
    elif op == "-":
        if not allow_negative and b > a:
            a, b = b, a
        value = a - b
    else:
        raise ValueError(f"arithmetic: unsupported operator {op!r} (use '+' or '-')")
    return {"prompt": f"{a}{op}{b}=", "answer": str(value)}


def _distinct_problems(digits: tuple[int, int], ops: Sequence[str]) -> int:
    """An upper bound on distinct prompts, so asking for more fails fast instead of looping forever."""
    lo, hi = digits
    count = sum(10 if n == 1 else 9 * 10 ** (n - 1) for n in range(lo, hi + 1))
    return count * count * len(set(ops))


def make_dataset(n: int, seed: int, digits: tuple[int, int] = (1, 3), ops: Sequence[str] = ("+",),
                 allow_negative: bool = False, exclude: Iterable[str] = ()) -> list[dict[str, str]]:
    """`n` records with distinct prompts, none of them in `exclude`; deterministic in all arguments."""
    if not 1 <= digits[0] <= digits[1]:
        raise ValueError(f"arithmetic: digits must be (lo, hi) with 1 <= lo <= hi, got {digits}")
    excluded = set(exclude)
    if n + len(excluded) > _distinct_problems(digits, ops):
        raise ValueError(f"arithmetic: {n} distinct problems requested but digits={digits}, ops={tuple(ops)} "
                         f"allow at most {_distinct_problems(digits, ops) - len(excluded)}")
    rng = random.Random(seed)
    seen, records = set(excluded), []
    while len(records) < n:
        rec = make_problem(rng, digits, ops, allow_negative)
        if rec["prompt"] not in seen:
            seen.add(rec["prompt"])
            records.append(rec)
    return records


def make_splits(n_train: int, n_test: int, seed: int, **kwargs) -> tuple[list[dict], list[dict]]:
    """Train and held-out sets with no prompt in common (drawn as one distinct set, then cut)."""
    records = make_dataset(n_train + n_test, seed, **kwargs)
    return records[:n_train], records[n_train:]


def split_records(records: Sequence[dict], n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle by `seed` and hold out `n_test` distinct prompts; every copy of a prompt goes to one side."""
    prompts = sorted({r["prompt"] for r in records})
    if n_test > len(prompts):
        raise ValueError(f"arithmetic: cannot hold out {n_test} of {len(prompts)} distinct prompts")
    random.Random(seed).shuffle(prompts)
    held_out = set(prompts[:n_test])
    train = [r for r in records if r["prompt"] not in held_out]
    test = [r for r in records if r["prompt"] in held_out]
    return train, test


def extract_answer(completion: str) -> str:
    """The answer a completion gives: its first line, without surrounding whitespace or special-token text.

    A model that stops with EOS decodes to "357" (skip_special_tokens) or "357</s>"; one that goes on
    after a newline is judged on the first line only. Anything else after the number makes it wrong
    ("3570", "357+1").
    """
    text = completion
    for special in _TRAILING_SPECIALS:
        cut = text.find(special)
        if cut != -1:
            text = text[:cut]
    return text.strip().split("\n", 1)[0].strip()


def score(record: dict, completion: str) -> float:
    """1.0 when the completion's answer equals `record["answer"]` exactly, else 0.0."""
    if "answer" not in record:
        raise KeyError("arithmetic: record has no 'answer' field")
    return 1.0 if extract_answer(completion) == str(record["answer"]).strip() else 0.0


class ArithmeticVerifier:
    """Verifier over arithmetic records: exact-answer reward per completion."""

    @staticmethod
    def check_record(record: dict):
        if "answer" not in record:
            raise ValueError("missing field 'answer' (the arithmetic verifier scores against it)")

    def __call__(self, records: Sequence[dict], completions: Sequence[str]) -> list[float]:
        if len(records) != len(completions):
            raise ValueError(f"arithmetic: {len(records)} records but {len(completions)} completions")
        return [score(r, c) for r, c in zip(records, completions)]


def make_tokenizer(ops: Sequence[str] = ("+", "-")) -> CharTokenizer:
    """The tokenizer for this task: digits, the operators in use and '='."""
    extra = "".join(op for op in ("+", "-") if op in ops)
    return CharTokenizer("0123456789" + extra + "=")
