"""Code-with-tests rewards for APPS-style records, each candidate run in the sandbox.

A record holds `question` and `input_output` = {"inputs": [...], "outputs": [...], optional "fn_name"}
(a dict or its JSON string). Without fn_name each input is the program's stdin and the test passes when
stdout equals the expected output up to trailing whitespace on each line and trailing blank lines. With
fn_name each input is the argument list of a call to that function (or to `Solution().<fn_name>`,
LeetCode style) and the test passes when the return value equals the expected output, or its single
element when the expected output is a one-element list (APPS wraps return values that way).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .sandbox import Sandbox, SandboxLimits

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}
_RESULT_MARK = "\x00meshrl-result:"

# Runs the candidate as a module, then one call; the candidate's prints go to stderr so that stdout
# carries only the return value. Reads its arguments before the candidate runs, so the candidate
# cannot consume them.
_CALL_HARNESS = """\
import json, sys
args = json.loads(sys.stdin.read())
real_stdout, sys.stdout = sys.stdout, sys.stderr
namespace = {"__name__": "__main__"}
with open("solution.py", encoding="utf-8") as f:
    exec(compile(f.read(), "solution.py", "exec"), namespace)
fn = namespace.get(FN_NAME)
if fn is None and "Solution" in namespace:
    fn = getattr(namespace["Solution"](), FN_NAME)
if fn is None:
    raise SystemExit(f"no function named {FN_NAME!r}")
result = fn(*args)
real_stdout.write(MARK + json.dumps(result) + "\\n")
real_stdout.flush()
"""


def extract_code(completion: str) -> str:
    """The program in a completion: the last ```python block, else the last fenced block, else all text.

    An unclosed fence (a completion cut at its length limit) counts as running to the end.
    """
    blocks = _FENCE.findall(completion)
    python_blocks = [body for tag, body in blocks if tag.lower() in _PYTHON_TAGS]
    if python_blocks:
        return python_blocks[-1]
    if blocks:
        return blocks[-1][1]
    return completion


def parse_tests(record: dict) -> tuple[list, list, str | None]:
    """(inputs, outputs, fn_name) of a record; ValueError naming the field when malformed."""
    if "input_output" not in record:
        raise ValueError("code task: record has no 'input_output' field")
    io = record["input_output"]
    if isinstance(io, str):
        try:
            io = json.loads(io)
        except json.JSONDecodeError as e:
            raise ValueError(f"code task: 'input_output' is not valid JSON ({e.msg})") from None
    if not isinstance(io, dict) or not isinstance(io.get("inputs"), list) or not isinstance(io.get("outputs"), list):
        raise ValueError("code task: 'input_output' needs lists 'inputs' and 'outputs'")
    inputs, outputs, fn_name = io["inputs"], io["outputs"], io.get("fn_name") or None
    if len(inputs) != len(outputs):
        raise ValueError(f"code task: 'input_output' has {len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        raise ValueError("code task: 'input_output' has no tests")
    return inputs, outputs, fn_name


def _as_text(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value) + "\n"
    raise ValueError(f"code task: '{field}' entries must be strings or lists of lines, got {type(value).__name__}")


def normalize_output(text: str) -> list[str]:
    """Lines without trailing whitespace, trailing blank lines dropped: the equality the code tasks define."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def outputs_match(got: str, expected: str) -> bool:
    return normalize_output(got) == normalize_output(expected)


def returns_match(got: Any, expected: Any) -> bool:
    # Both sides went through JSON, so tuples are lists on each side.
    if got == expected:
        return True
    return isinstance(expected, list) and len(expected) == 1 and got == expected[0]


class CodeVerifier:
    """Verifier for code-with-tests records: each completion's program against its record's tests.

    `reward="all"` gives 1.0 when every test passes (stopping at the first failure), `"fraction"` the
    share of tests passed. Candidates run in parallel on `max_workers` threads, each test in its own
    sandbox run; `max_tests` caps the tests run per record (the first ones).
    """

    def __init__(self, *, reward: str = "all", limits: SandboxLimits | None = None,
                 sandbox: Sandbox | None = None, max_workers: int = 2, max_tests: int | None = None):
        if reward not in ("all", "fraction"):
            raise ValueError(f"code task: reward must be 'all' or 'fraction', got {reward!r}")
        if sandbox is not None and limits is not None:
            raise ValueError("code task: pass limits or a sandbox, not both")
        self.reward = reward
        self.sandbox = sandbox or Sandbox(limits)
        self.max_workers = max_workers
        self.max_tests = max_tests

    prompt_field = "question"  # APPS-style records

    @staticmethod
    def check_record(record: dict):
        parse_tests(record)

    def __call__(self, records: Sequence[dict], completions: Sequence[str]) -> list[float]:
        if len(records) != len(completions):
            raise ValueError(f"code task: {len(records)} records but {len(completions)} completions")
        tests = [parse_tests(r) for r in records]  # all malformed records fail before anything runs
        with ThreadPoolExecutor(max_workers=max(1, self.max_workers)) as pool:
            return list(pool.map(self.score, tests, completions))

    def score(self, tests: tuple[list, list, str | None], completion: str) -> float:
        inputs, outputs, fn_name = tests
        if self.max_tests is not None:
            inputs, outputs = inputs[: self.max_tests], outputs[: self.max_tests]
        code = extract_code(completion)
        passed = 0
        for test_input, expected in zip(inputs, outputs):
            ok = (self._run_call(code, fn_name, test_input, expected) if fn_name
                  else self._run_stdin(code, test_input, expected))
            passed += ok
            if not ok and self.reward == "all":
                return 0.0
        return passed / len(inputs) if self.reward == "fraction" else 1.0

    def _run_stdin(self, code: str, test_input: Any, expected: Any) -> bool:
        stdin, want = _as_text(test_input, "inputs"), _as_text(expected, "outputs")
        result = self.sandbox.run({"solution.py": code}, "solution.py", stdin)
        return result.ok and outputs_match(result.stdout.decode("utf-8", errors="replace"), want)

    def _run_call(self, code: str, fn_name: str, test_input: Any, expected: Any) -> bool:
        args = test_input if isinstance(test_input, list) else [test_input]
        harness = _CALL_HARNESS.replace("FN_NAME", repr(fn_name)).replace("MARK", repr(_RESULT_MARK))
        files = {"solution.py": code, "harness.py": harness}
        result = self.sandbox.run(files, "harness.py", json.dumps(args))
        if not result.ok:
            return False
        text = result.stdout.decode("utf-8", errors="replace")
        mark = text.rfind(_RESULT_MARK)
        if mark == -1:
            return False
        try:
            got = json.loads(text[mark + len(_RESULT_MARK):])
        except json.JSONDecodeError:  # e.g. a return value JSON cannot carry
            return False
        return returns_match(got, json.loads(json.dumps(expected)))
