"""`meshrl plot`: PNG curves from a run's metrics.jsonl, and one metric compared across runs.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly rather than through
pyplot: no backend switch, no display, and none of pyplot's process-wide figure registry.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from typing import Iterable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from meshrl.engine.runtime.metrics import numeric_series, phases, read_metrics

DEFAULT_SMOOTHING = 0.6  # TensorBoard's default EMA weight, so curves look as they do there
GRID_COLUMNS = 3


def smooth(values: Sequence[float], weight: float = DEFAULT_SMOOTHING) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); NaNs hold the last value.

    Debiasing divides by 1 - weight**n so the first points are not dragged towards zero.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, acc, n = [], 0.0, 0
    for v in values:
        if math.isfinite(v):
            acc = weight * acc + (1.0 - weight) * v
            n += 1
        out.append(acc / (1.0 - weight ** n) if n else math.nan)
    return out


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "metric"


def _parse_metrics(metrics: str | Iterable[str] | None) -> list[str] | None:
    if metrics is None:
        return None
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    return [m.strip() for m in names if m.strip()] or None


def _draw(ax, steps, values, *, color, label=None, weight=DEFAULT_SMOOTHING) -> None:
    """Raw values faint, their smoothed curve solid; a lone point gets a marker to be visible."""
    marker = "o" if len(steps) == 1 else None
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=1.0, marker=marker, markersize=3)
    ax.plot(steps, smooth(values, weight), color=color, linewidth=1.6, label=label, marker=marker,
            markersize=3)


def _save(fig: Figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
             metrics: str | Iterable[str] | None = None, *, smoothing: float = DEFAULT_SMOOTHING,
             title: str | None = None, strict: bool = True) -> list[str]:
    """One PNG per phase (`<out_dir>/<phase>.png`), a subplot per numeric metric over step.

    `out_dir` defaults to `run_dir/plots`; `metrics` (names or "a,b,c") selects and orders the
    subplots, and a name found in no phase is an error so a typo doesn't pass silently
    (`strict=False` ignores such names, for runs of algorithms that log different metrics).
    """
    run_dir = os.fspath(run_dir)
    out_dir = os.fspath(out_dir) if out_dir is not None else os.path.join(run_dir, "plots")
    wanted = _parse_metrics(metrics)
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}: no metrics logged yet")
    title = title or os.path.basename(os.path.abspath(run_dir))
    per_phase = {ph: numeric_series(records, ph) for ph in phases(records)}
    if wanted:
        available = set().union(*per_phase.values())
        missing = [m for m in wanted if m not in available]
        if missing and strict:
            raise ValueError(f"{run_dir}: no metric named {', '.join(missing)}; "
                             f"available: {', '.join(sorted(available))}")
    paths = []
    for phase, series in per_phase.items():
        names = [m for m in wanted if m in series] if wanted else list(series)
        if names:
            paths.append(_plot_grid(series, names, os.path.join(out_dir, f"{_safe_name(phase)}.png"),
                                    title=f"{title} · {phase}", smoothing=smoothing))
    return paths


def _plot_grid(series, names, path, *, title, smoothing) -> str:
    cols = min(GRID_COLUMNS, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.set_visible(False)
            continue
        steps, values = series[names[i]]
        _draw(ax, steps, values, color="C0", weight=smoothing)
        ax.set_title(names[i], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def run_labels(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Short distinct labels: each run's path relative to the runs' common parent."""
    paths = [os.path.abspath(os.fspath(d)) for d in run_dirs]
    if len(paths) == 1:
        return [os.path.basename(paths[0])]
    common = os.path.commonpath(paths)
    return [os.path.relpath(p, common) if p != common else os.path.basename(p) for p in paths]


def compare_runs(run_dirs: Sequence[str | os.PathLike], out_path: str | os.PathLike, metric: str, *,
                 phase: str = "train", labels: Sequence[str] | None = None,
                 smoothing: float = DEFAULT_SMOOTHING) -> str:
    """One metric of one phase from several runs overlaid on one axis; returns `out_path`.

    Runs that never logged the metric are left out with a warning (e.g. DPO has no critic
    loss); if none has it, that is an error.
    """
    labels = list(labels) if labels is not None else run_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        series = numeric_series(read_metrics(run_dir), phase)
        if metric not in series:
            warnings.warn(f"{run_dir}: no {phase} metric {metric!r}; left out of the comparison")
            continue
        steps, values = series[metric]
        _draw(ax, steps, values, color=f"C{i % 10}", label=label, weight=smoothing)
        drawn += 1
    if not drawn:
        raise ValueError(f"none of the runs logged {phase} metric {metric!r}")
    ax.set_title(f"{phase} · {metric}")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, os.fspath(out_path))


def add_arguments(p) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory with metrics.jsonl")
    p.add_argument("--out", help="output folder (default RUN_DIR/plots; required with several runs)")
    p.add_argument("--metrics", help="comma-separated metric names (default: all)")
    p.add_argument("--phase", default="train", help="phase compared across several runs")
    p.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING, help="EMA weight in [0, 1)")


def _common_metrics(run_dirs, phase) -> list[str]:
    """Metrics of `phase` present in every run, in the first run's order."""
    names = [list(numeric_series(read_metrics(d), phase)) for d in run_dirs]
    return [m for m in names[0] if all(m in n for n in names[1:])]


def run(args) -> int:
    """One run: its per-phase grids. Several: a grid per run under OUT/<label>/, plus
    OUT/compare_<phase>_<metric>.png for each selected (default: shared) metric."""
    runs = args.run_dirs
    if len(runs) == 1:
        paths = plot_run(runs[0], args.out, args.metrics, smoothing=args.smoothing)
    else:
        if not args.out:
            raise ValueError("--out is required when plotting several runs")
        labels = run_labels(runs)
        paths = []
        for run_dir, label in zip(runs, labels):
            paths += plot_run(run_dir, os.path.join(args.out, label), args.metrics,
                              smoothing=args.smoothing, title=label, strict=False)
        for metric in _parse_metrics(args.metrics) or _common_metrics(runs, args.phase):
            out = os.path.join(args.out, f"compare_{_safe_name(args.phase)}_{_safe_name(metric)}.png")
            paths.append(compare_runs(runs, out, metric, phase=args.phase, labels=labels,
                                      smoothing=args.smoothing))
    for path in paths:
        print(path)
    return 0
