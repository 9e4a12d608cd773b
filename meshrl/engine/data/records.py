"""Data files as records: JSONL (one JSON object a line) or Parquet (one record a row), by extension.

Every loader reads through `read_data`, so prompts, SFT examples, pairs, code tasks and `meshrl generate
--prompts` accept the same two formats. A Parquet row becomes the dict its JSONL line would be: a
column is a field, a struct a dict, a list a list, a map a dict (verl's recipes store `prompt` as a
list of chat messages and `reward_model` as a struct; both arrive as Python lists and dicts). A null
column value is an absent field: every row of a Parquet file has every column, so a null is how a
file converted from JSONL (by Hugging Face `datasets`, pandas) says a line lacked the field, and
loaders and verifiers that ask `"answer" in record` must see it missing. Nulls inside structs and
lists stay None. Columns of types JSON cannot hold (binary, timestamps, decimals, ...) are refused up
front, so that a record read from Parquet can always be written back as a JSONL line (`meshrl
generate` does).

pyarrow reads Parquet; it is an optional dependency (`meshrl[parquet]`), imported only when a Parquet
file is read.
"""
from __future__ import annotations

import os

from .jsonl import DataError, read_jsonl

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
_BATCH_ROWS = 4096  # rows converted to Python at a time: one batch of Arrow data in memory, not the file


class Row(int):
    """A 1-based Parquet row number: an int that prints as "row N", so that the loaders' "file:line"
    messages read "data.parquet:row 3" without each loader knowing the format."""

    def __str__(self) -> str:  # f"{n}" too: int's __format__ with an empty spec is str()
        return f"row {int(self)}"


def read_data(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """[(line number, record)] of a .jsonl/.json file, or [(Row, record)] of a .parquet file."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix in JSONL_SUFFIXES:
        return read_jsonl(path)
    if suffix in PARQUET_SUFFIXES:
        return read_parquet(path)
    raise DataError(f"{path}: unknown data file type '{suffix or '(no extension)'}': give a .jsonl, .json "
                    "or .parquet file")


def read_parquet(path: str | os.PathLike) -> list[tuple[Row, dict]]:
    """[(Row, record)] for each row, read a batch of rows at a time (no whole-file table, no pandas)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file: check the path")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow, which is not installed: "
                        "pip install 'meshrl[parquet]'") from None
    try:
        f = pq.ParquetFile(path)
        for name, type_ in zip(f.schema_arrow.names, f.schema_arrow.types):
            if not _json_like(pa, type_):
                raise DataError(f"{path}: column '{name}' is {type_}, which a JSON record cannot hold: "
                                "cast it to a string or number, or drop the column")
        out, n = [], 0
        for batch in f.iter_batches(batch_size=_BATCH_ROWS):
            # "lossy": a map with a repeated key keeps the last value, as json.loads does
            for rec in batch.to_pylist(maps_as_pydicts="lossy"):
                n += 1
                out.append((Row(n), {k: v for k, v in rec.items() if v is not None}))
    except (pa.ArrowException, OSError) as e:  # not Parquet, truncated, unreadable
        raise DataError(f"{path}: cannot read it as Parquet ({' '.join(str(e).split())})") from None
    return out


def _json_like(pa, t) -> bool:
    """Whether values of Arrow type t come out of to_pylist as JSON values (None, bool, int, float,
    str, list, dict)."""
    types = pa.types
    if _is_text(types, t) or types.is_null(t) or types.is_boolean(t):
        return True
    if types.is_integer(t) or types.is_floating(t):
        return True
    if (types.is_list(t) or types.is_large_list(t) or types.is_fixed_size_list(t) or types.is_list_view(t)
            or types.is_large_list_view(t)):
        return _json_like(pa, t.value_type)
    if types.is_struct(t):
        return all(_json_like(pa, t.field(i).type) for i in range(t.num_fields))
    if types.is_map(t):  # a JSON object's keys are strings
        return _is_text(types, t.key_type) and _json_like(pa, t.item_type)
    if types.is_dictionary(t):  # dictionary-encoded strings, as pandas categoricals are written
        return _json_like(pa, t.value_type)
    return False


def _is_text(types, t) -> bool:
    return types.is_string(t) or types.is_large_string(t) or types.is_string_view(t)


__all__ = ["DataError", "Row", "read_data", "read_parquet"]
