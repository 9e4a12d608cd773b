"""Run metrics: JSONL + TensorBoard logging from one rank, reading them back, and a tqdm bar.

`run_dir/metrics.jsonl` is the source of truth (plots, tables and tests read it); TensorBoard
under `run_dir/tensorboard/` is for watching a run live. Each line is
`{"step": int, "phase": str, "time": float, **metrics}` with non-finite values as null.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any, Iterable, Mapping

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
RESERVED_KEYS = ("step", "phase", "time")


def metrics_path(run_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(run_dir), METRICS_FILE)


def _scalar(name: str, value: Any) -> int | float | None:
    """One metric value as a JSON-safe number; None stands for NaN/inf."""
    if hasattr(value, "item"):  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {name!r} is not a number: {value!r}") from None
    return value if math.isfinite(value) else None


def _kept_before(line: str, resume_step: int) -> bool:
    """Whether a line was logged before checkpoint ``resume_step``: train lines carry the step's
    0-based index (steps 0..N-1 precede checkpoint N), other phases the count of steps done
    (evaluation at N runs before checkpoint N is saved)."""
    try:
        record = json.loads(line)
        step = int(record["step"])
    except (ValueError, KeyError, TypeError):
        return False  # a line a killed writer left half-written
    return step < resume_step if record.get("phase", "train") == "train" else step <= resume_step


def _truncate_after(path: str, resume_step: int | None) -> list[str]:
    """Keep only the lines logged before checkpoint ``resume_step`` (none when None), atomically;
    returns them.

    Written to a temporary file and renamed over the original, so a crash here leaves either
    the old file or the new one, never a half-rewritten log.
    """
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []
    if resume_step is not None:
        kept = [line + "\n" for line in lines if _kept_before(line, resume_step)]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".metrics.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return kept


class MetricsLogger:
    """Appends metrics to `run_dir/metrics.jsonl` and TensorBoard; a no-op where `enabled` is False.

    Callers pass `enabled=(rank == 0)` so one process writes. `resume_step=N` continues a run
    whose checkpoint is at step N (N steps done): what the killed run logged after that checkpoint
    is dropped (train lines from step index N, other phases after N), TensorBoard purges its
    events from step N on, and the kept evaluation at N is written to it again. Without
    `resume_step` the run starts afresh: an existing metrics.jsonl is emptied, since the new
    run logs the same steps again and interleaving the two would corrupt every curve.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.run_dir = os.fspath(run_dir)
        self.enabled = enabled
        self._file = None
        self._writer = None
        if not enabled:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        path = metrics_path(self.run_dir)
        kept = _truncate_after(path, resume_step)
        self._file = open(path, "a", encoding="utf-8")
        if tensorboard:
            # Imported here: tensorboard's import costs ~1 s, and non-zero ranks never need it.
            from torch.utils.tensorboard import SummaryWriter
            purge = resume_step or 0  # purge hides steps >= purge, of every tag
            self._writer = SummaryWriter(os.path.join(self.run_dir, TENSORBOARD_DIR), purge_step=purge)
            for line in kept:  # the evaluation at the checkpoint's step, hidden by the purge
                record = json.loads(line)
                if record["step"] == resume_step:
                    self._add_scalars(record["step"], record["phase"], record)

    def log(self, step: int, metrics: Mapping[str, Any], *, phase: str = "train") -> None:
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger.log after close()")
        clash = [k for k in metrics if k in RESERVED_KEYS]
        if clash:
            raise ValueError(f"metric names {clash} clash with the reserved keys {list(RESERVED_KEYS)}")
        values = {str(k): _scalar(k, v) for k, v in metrics.items()}
        record = {"step": int(step), "phase": phase, "time": time.time(), **values}
        # One write per line and a flush: a killed run loses nothing it logged, and the OS
        # keeps flushed data even when the process dies (no fsync: that guards power loss only).
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            self._add_scalars(step, phase, values)

    def _add_scalars(self, step: int, phase: str, values: Mapping[str, Any]) -> None:
        for name, value in values.items():
            if value is not None and name not in RESERVED_KEYS:
                self._writer.add_scalar(f"{phase}/{name}", value, int(step))
        self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All records of `run_dir/metrics.jsonl` (or of a JSONL path) in file order; nulls stay None.

    A half-written last line (the writer was killed mid-write) is skipped; a malformed line
    anywhere else is an error, since nothing meshrl does produces one.
    """
    path = os.fspath(run_dir)
    if os.path.isdir(path):
        path = metrics_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics at {path}")
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: malformed metrics line: {e}") from None
    return records


def numeric_series(records: Iterable[dict], phase: str) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} for one phase, in step order; None becomes NaN.

    Metrics are numeric fields other than step/phase/time; a metric absent from a record simply
    has no point at that step (e.g. eval metrics logged every k steps).
    """
    rows = sorted((r for r in records if r.get("phase") == phase), key=lambda r: r["step"])
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k in RESERVED_KEYS or isinstance(v, bool) or not (v is None or isinstance(v, (int, float))):
                continue
            steps, vals = series.setdefault(k, ([], []))
            steps.append(r["step"])
            vals.append(math.nan if v is None else float(v))
    return series


def phases(records: Iterable[dict]) -> list[str]:
    """Phases in order of first appearance."""
    return list(dict.fromkeys(r.get("phase", "train") for r in records))


def _mean(xs: list[float]) -> float:
    finite = [x for x in xs if math.isfinite(x)]
    return sum(finite) / len(finite) if finite else math.nan


def summarize(run_dir: str | os.PathLike, *, window: int = 5) -> dict[str, dict[str, dict[str, float]]]:
    """{phase: {metric: {"n", "last", "first_mean", "last_mean", "delta"}}} over finite values.

    first_mean/last_mean average the first/last `window` points (fewer if the run is shorter);
    delta = last_mean - first_mean, the "did it move the right way" figure the algorithm tests
    check. "last" is the last finite value; a metric with none has NaN throughout.
    """
    records = read_metrics(run_dir)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for phase in phases(records):
        stats = {}
        for name, (_, vals) in numeric_series(records, phase).items():
            finite = [v for v in vals if math.isfinite(v)]
            first, last = _mean(finite[:window]), _mean(finite[-window:])
            stats[name] = {"n": len(finite), "last": finite[-1] if finite else math.nan,
                           "first_mean": first, "last_mean": last, "delta": last - first}
        out[phase] = stats
    return out


def format_metrics(metrics: Mapping[str, Any], keys: Iterable[str] | None = None,
                   limit: int = 4) -> dict[str, str]:
    """Up to `limit` metrics as short strings for a progress bar; `keys` picks and orders them."""
    names = [k for k in keys if k in metrics] if keys is not None else list(metrics)
    out = {}
    for name in names[:limit]:
        v = metrics[name]
        if hasattr(v, "item"):
            v = v.item()
        out[name] = "nan" if v is None else (f"{v:.4g}" if isinstance(v, (int, float)) else str(v))
    return out


class MetricsBar(tqdm):
    """tqdm with `show(metrics)`: the bar's postfix shows a few formatted metrics."""

    def show(self, metrics: Mapping[str, Any], keys: Iterable[str] | None = None, limit: int = 4) -> None:
        self.set_postfix(format_metrics(metrics, keys, limit))


def progress(total: int | None, *, desc: str | None = None, enabled: bool = True, **kwargs) -> MetricsBar:
    """A progress bar; pass `enabled=(rank == 0)` so only one rank draws. Extra kwargs go to tqdm."""
    kwargs.setdefault("dynamic_ncols", True)
    return MetricsBar(total=total, desc=desc, disable=not enabled, **kwargs)
