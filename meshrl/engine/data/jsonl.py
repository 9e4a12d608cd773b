"""JSONL in and out, with errors that name the file, the line and the field."""
from __future__ import annotations

import json
import os


class DataError(ValueError):
    """Bad input data; the message is one line naming file, line and field."""


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """[(line number, record)] for each non-blank line; a line that is not a JSON object fails."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file: check the path")
    out = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark some editors write is skipped
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}): fix the line") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            out.append((lineno, rec))
    return out


def write_jsonl(path: str | os.PathLike, records) -> None:
    """Write atomically: a crash mid-write never leaves a half file where a whole one was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def require(rec: dict, field: str, where: str, kind=None):
    """rec[field], or a one-line DataError naming ``where`` (file:line) and the field."""
    if field not in rec or rec[field] is None:
        raise DataError(f"{where}: missing field '{field}'")
    value = rec[field]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field '{field}' must be {names}, got {type(value).__name__}")
    return value
