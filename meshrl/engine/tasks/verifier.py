"""The verifier interface and the registry of built-in ones."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Verifier(Protocol):
    """Scores completions against their records: one float reward per (record, completion) pair.

    Optional, read with getattr by the data loading: ``prompt_field`` (the record's text to prompt
    with, "prompt" when absent) and ``check_record(record)``, raising ValueError for a record the
    verifier could not score, so a bad file stops the run at load, not mid-run."""

    def __call__(self, records: Sequence[dict], completions: Sequence[str]) -> list[float]: ...


def _arithmetic(**kwargs) -> Verifier:
    from .arithmetic import ArithmeticVerifier
    return ArithmeticVerifier(**kwargs)


def _code(**kwargs) -> Verifier:
    from .code import CodeVerifier
    return CodeVerifier(**kwargs)


VERIFIERS: dict[str, Callable[..., Verifier]] = {"arithmetic": _arithmetic, "code": _code}


def get_verifier(name: str, **kwargs) -> Verifier:
    """A new verifier by name ("arithmetic", "code"); kwargs go to its constructor."""
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; known: {', '.join(sorted(VERIFIERS))}")
    return VERIFIERS[name](**kwargs)
