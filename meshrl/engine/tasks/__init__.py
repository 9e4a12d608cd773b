"""Verifiable-reward tasks: an arithmetic task with its tokenizer, and code with tests run in a sandbox."""

from .arithmetic import (ArithmeticVerifier, extract_answer, make_dataset, make_problem, make_splits,
                         make_tokenizer, score, split_records)
from .char_tokenizer import CharTokenizer
from .code import CodeVerifier, extract_code, outputs_match, parse_tests
from .sandbox import Sandbox, SandboxError, SandboxLimits, SandboxResult
from .verifier import Verifier, get_verifier

__all__ = [
    "ArithmeticVerifier", "CharTokenizer", "CodeVerifier", "Sandbox", "SandboxError", "SandboxLimits",
    "SandboxResult", "Verifier", "extract_answer", "extract_code", "get_verifier", "make_dataset",
    "make_problem", "make_splits", "make_tokenizer", "outputs_match", "parse_tests",
    "score", "split_records",
]
