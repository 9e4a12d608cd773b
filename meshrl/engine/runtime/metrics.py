"""Run metrics: JSONL, TensorBoard and optional experiment trackers from one rank, reading them
back, and a tqdm bar.

`run_dir/metrics.jsonl` is the source of truth (plots, tables and tests read it); TensorBoard
under `run_dir/tensorboard/` is for watching a run live, and so are Weights & Biases
(`logging.wandb`, offline by default) and MLflow (`logging.mlflow`, a file store under run_dir by
default). Each line is `{"step": int, "phase": str, "time": float, **metrics}` with non-finite
values as null; TensorBoard and the trackers name a metric `phase/name` (`metric_key`) and leave
its non-finite values out.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import tempfile
import time
import urllib.parse
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id"  # the W&B run id under run_dir: a resumed run logs into the same run
MLFLOW_ID_FILE = "mlflow_id"  # the MLflow run id under run_dir, likewise
WANDB_MODES = ("offline", "online", "disabled")
RESERVED_KEYS = ("step", "phase", "time")
# MLflow's limits: values of a param, params and metrics in one log_batch request
MLFLOW_PARAM_CHARS, MLFLOW_BATCH_PARAMS, MLFLOW_BATCH_METRICS = 6000, 100, 1000


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


def metric_key(phase: str, name: str) -> str:
    """The name TensorBoard, W&B and MLflow give metric ``name`` of ``phase``: ``train/loss``."""
    return f"{phase}/{name}"


def _finite(values: Mapping[str, int | float | None], phase: str) -> dict[str, int | float]:
    """``{phase/name: value}`` without the non-finite values (None here): the trackers' view."""
    return {metric_key(phase, k): v for k, v in values.items() if v is not None}


class Sink(Protocol):
    """Where MetricsLogger sends each record. ``values`` are numbers, None standing for NaN/inf,
    already checked against RESERVED_KEYS; a sink is built on the logging rank only."""

    def log(self, step: int, values: Mapping[str, int | float | None], phase: str) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """`run_dir/metrics.jsonl`: one line per record, flushed. Opening it keeps only the lines logged
    before checkpoint ``resume_step`` (none when None); ``kept`` holds them."""

    def __init__(self, run_dir: str, resume_step: int | None):
        path = metrics_path(run_dir)
        self.kept = _truncate_after(path, resume_step)
        self._file = open(path, "a", encoding="utf-8")

    def log(self, step: int, values: Mapping[str, int | float | None], phase: str) -> None:
        record = {"step": int(step), "phase": phase, "time": time.time(), **values}
        # One write per line and a flush: a killed run loses nothing it logged, and the OS
        # keeps flushed data even when the process dies (no fsync: that guards power loss only).
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """TensorBoard events under `run_dir/tensorboard/`, tagged ``phase/name``, flushed per record.

    ``resume_step=N`` purges the killed run's events from step N on, of every tag, and writes the
    ``kept`` JSONL lines logged at N (the evaluation before checkpoint N) again, which the purge hides.
    """

    def __init__(self, run_dir: str, resume_step: int | None, kept: Iterable[str] = ()):
        # Imported here: tensorboard's import costs ~1 s, and non-zero ranks never need it.
        from torch.utils.tensorboard import SummaryWriter
        self._writer = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR), purge_step=resume_step or 0)
        for line in kept:
            record = json.loads(line)
            if record["step"] == resume_step:
                values = {k: v for k, v in record.items() if k not in RESERVED_KEYS}
                self.log(record["step"], values, record["phase"])

    def log(self, step: int, values: Mapping[str, int | float | None], phase: str) -> None:
        for key, value in _finite(values, phase).items():
            self._writer.add_scalar(key, value, int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def check_trackers(spec: Any, error: Callable[[str], Exception]) -> None:
    """Raise ``error(one line)`` when ``spec`` (a LogSpec: ``cfg.logging``) names an unknown W&B
    mode or asks for a tracker whose package is not installed, so a run stops before it builds
    anything. Looks the packages up without importing them (each import takes seconds)."""
    if spec.wandb_mode not in WANDB_MODES:
        raise error(f"logging.wandb_mode={spec.wandb_mode}: use one of {', '.join(WANDB_MODES)}")
    if _wants_wandb(spec) and importlib.util.find_spec("wandb") is None:
        raise error(_missing("wandb", "wandb"))
    if spec.mlflow and importlib.util.find_spec("mlflow") is None:
        raise error(_missing("mlflow", "mlflow-skinny"))


def _wants_wandb(spec: Any) -> bool:
    # wandb_mode=disabled switches W&B off as WANDB_MODE=disabled does, so it needs no package
    return bool(spec.wandb) and spec.wandb_mode != "disabled"


def _missing(key: str, package: str, why: str | None = None) -> str:
    why = why or f"the {key} package is not installed"
    return f"logging.{key}=true: {why}: pip install {package} (or meshrl[trackers]), or set logging.{key}=false"


def _import_failed(module: str, e: ImportError) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"importing {module} failed ({first})"


def _config_error(message: str) -> Exception:
    # config.py imports torch; readers of metrics (plots, tables) never need it, so import late
    from .config import RunConfigError
    return RunConfigError(message)


@contextlib.contextmanager
def _env_defaults(values: Mapping[str, str]) -> Iterator[None]:
    """Set each of ``values`` the environment does not set, for the block only (MLflow reads some
    switches from the environment alone); what the user set stays as it is."""
    added = [k for k in values if k not in os.environ]
    for k in added:
        os.environ[k] = values[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _stored_id(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def _store_id(path: str, run_id: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(run_id + "\n")


def _config_dict(config: Any) -> dict:
    """The run's config as a plain dict: a dataclass (RunConfig) or a mapping; None is empty."""
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config)


def _flat_params(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """``{"ppo.batch_size": "32", "models.actor.optim.lr": "1e-05", ...}``: MLflow params are flat
    strings; non-strings as JSON (``null``, ``[0.9, 0.95]``), empty mappings as ``{}``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v, default=str)
    return out


class WandbSink:
    """A Weights & Biases run: each record's finite values under ``phase/name`` at ``step``, and the
    run's config once, as the run's config.

    Offline (the default) needs no network: it writes `run_dir/wandb/offline-run-*/`, which
    `wandb sync --id ID DIRS` uploads. The run id is kept in `run_dir/wandb_id`; ``resume=True``
    logs under the stored id: online, W&B continues that run (resume="allow"); offline, each start
    writes its own directory with that id, and syncing them with ``--id`` joins them in start
    order. A fresh start (``resume=False``) gets a new id. W&B cannot drop what a killed run logged
    after its checkpoint, so there those steps may appear twice (metrics.jsonl keeps each once).
    """

    def __init__(self, run_dir: str, *, project: str, mode: str = "offline", group: str | None = None,
                 name: str | None = None, config: Mapping | None = None, resume: bool = False):
        try:
            import wandb  # here: its import takes ~2 s, paid only by rank 0 of runs that ask for it
        except ImportError as e:
            raise _config_error(_missing("wandb", "wandb", _import_failed("wandb", e))) from None
        id_path = os.path.join(run_dir, WANDB_ID_FILE)
        run_id = _stored_id(id_path) if resume else None  # None: W&B makes a new one
        offline = mode == "offline"
        settings = wandb.Settings(
            silent=offline,  # offline it has nothing to say that the run directory does not hold
            console="off",  # W&B would wrap the process's stdout and stderr, tqdm's bar included
        )
        self._run = wandb.init(
            project=project, group=group, name=name, id=run_id, dir=run_dir, mode=mode,
            config=dict(config or {}), settings=settings,
            # offline W&B ignores resume (with a warning): the id alone joins the pieces at sync
            resume="allow" if mode == "online" else None,
            reinit="create_new")  # a run object of its own: never finishes another run of the process
        self.run_id = self._run.id
        _store_id(id_path, self.run_id)

    def log(self, step: int, values: Mapping[str, int | float | None], phase: str) -> None:
        finite = _finite(values, phase)
        if finite:
            self._run.log(finite, step=int(step))

    def close(self) -> None:
        self._run.finish()


class MlflowSink:
    """An MLflow run in the store at ``uri``: each record's finite values as metrics ``phase/name``
    at ``step``, and the run's config once, as flat params and as the artifact config.yaml.

    The run id is kept in `run_dir/mlflow_id`; ``resume=True`` continues the stored run when the
    store has it, a fresh start creates a new run. MLflow cannot drop what a killed run logged
    after its checkpoint, so there those steps may appear twice (metrics.jsonl keeps each once).
    A name MLflow rejects (it allows letters, digits and ``_ - . : /`` and space) is left out of
    MLflow with a warning, once, rather than stopping the run.
    """

    def __init__(self, run_dir: str, *, uri: str, experiment: str, name: str | None = None,
                 config: Mapping | None = None, resume: bool = False):
        try:
            # MLflow decides at import whether a thread sends usage telemetry: a run that asked
            # for a local store must not reach for the network
            with _env_defaults({"MLFLOW_DISABLE_TELEMETRY": "true"}):
                from mlflow.entities import Metric, Param
                from mlflow.exceptions import MlflowException
                from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise _config_error(_missing("mlflow", "mlflow-skinny", _import_failed("mlflow", e))) from None
        self._Metric, self._Param, self._Error = Metric, Param, MlflowException
        # MLflow 3 refuses its file store ("maintenance mode") unless MLFLOW_ALLOW_FILE_STORE is
        # set; it is the store that needs no server and no database, so opt in for our calls only
        local = urllib.parse.urlparse(uri).scheme in ("", "file")
        self._env = {"MLFLOW_ALLOW_FILE_STORE": "true"} if local else {}
        self._rejected: set[str] = set()
        with _env_defaults(self._env):
            self._client = MlflowClient(tracking_uri=uri)
        id_path = os.path.join(run_dir, MLFLOW_ID_FILE)
        run_id = _stored_id(id_path) if resume else None
        if run_id is not None and self._active(run_id):
            self.run_id = run_id
            self._call("update_run", run_id, status="RUNNING")
        else:
            found = self._call("get_experiment_by_name", experiment)
            exp_id = found.experiment_id if found is not None else self._call("create_experiment", experiment)
            tags = {"meshrl.run_dir": os.path.abspath(run_dir)}
            self.run_id = self._call("create_run", exp_id, run_name=name, tags=tags).info.run_id
            config = dict(config or {})
            if config:
                # MLflow params cannot change once logged: the config goes in once, with the run
                params = [Param(k, v[:MLFLOW_PARAM_CHARS]) for k, v in _flat_params(config).items()]
                for i in range(0, len(params), MLFLOW_BATCH_PARAMS):
                    self._log_batch(params=params[i:i + MLFLOW_BATCH_PARAMS])
                self._call("log_dict", self.run_id, config, "config.yaml")
        _store_id(id_path, self.run_id)

    def log(self, step: int, values: Mapping[str, int | float | None], phase: str) -> None:
        now = int(time.time() * 1000)
        metrics = [self._Metric(k, float(v), now, int(step))
                   for k, v in _finite(values, phase).items() if k not in self._rejected]
        for i in range(0, len(metrics), MLFLOW_BATCH_METRICS):
            self._log_batch(metrics=metrics[i:i + MLFLOW_BATCH_METRICS])

    def close(self) -> None:
        self._call("set_terminated", self.run_id, "FINISHED")

    def _call(self, method: str, *args, **kwargs):
        with _env_defaults(self._env):
            return getattr(self._client, method)(*args, **kwargs)

    def _active(self, run_id: str) -> bool:
        try:
            return self._call("get_run", run_id).info.lifecycle_stage == "active"
        except self._Error as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":  # another store, or the run was purged
                return False
            raise

    def _log_batch(self, metrics: list = (), params: list = ()) -> None:
        """One log_batch; MLflow rejects a batch whole for one bad name, so a rejected batch is
        retried item by item and only the items MLflow rejects are left out."""
        try:
            self._call("log_batch", self.run_id, metrics=list(metrics), params=list(params))
        except self._Error as e:
            if e.error_code != "INVALID_PARAMETER_VALUE":
                raise
            items = [*metrics, *params]
            if len(items) > 1:
                for m in metrics:
                    self._log_batch(metrics=[m])
                for p in params:
                    self._log_batch(params=[p])
                return
            self._rejected.add(items[0].key)
            first = str(e.message).splitlines()[0]
            warnings.warn(f"MLflow rejects the name {items[0].key!r}, left out of MLflow "
                          f"(metrics.jsonl keeps it): {first}", stacklevel=2)


class MetricsLogger:
    """Appends metrics to `run_dir/metrics.jsonl`, TensorBoard and the trackers ``trackers`` asks
    for; a no-op where `enabled` is False.

    Callers pass `enabled=(rank == 0)` so one process writes. `resume_step=N` continues a run
    whose checkpoint is at step N (N steps done): what the killed run logged after that checkpoint
    is dropped (train lines from step index N, other phases after N), TensorBoard purges its
    events from step N on, and the kept evaluation at N is written to it again; W&B and MLflow
    continue the run whose id run_dir holds. Without `resume_step` the run starts afresh: an
    existing metrics.jsonl is emptied, since the new run logs the same steps again and interleaving
    the two would corrupt every curve, and the trackers start new runs.

    ``trackers`` is a LogSpec (``cfg.logging``: wandb, wandb_project, wandb_mode, mlflow,
    mlflow_uri, experiment); None logs to no tracker. ``config`` (a RunConfig or a mapping) is
    logged to each tracker once. A tracker whose package is missing, or an unknown W&B mode, is a
    RunConfigError before any file is touched.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None, trackers: Any = None, config: Any = None):
        self.run_dir = os.fspath(run_dir)
        self.enabled = enabled
        self._sinks: list[Sink] | None = None
        if not enabled:
            return
        if trackers is not None:
            check_trackers(trackers, _config_error)
        os.makedirs(self.run_dir, exist_ok=True)
        self._sinks = []
        try:
            jsonl = JsonlSink(self.run_dir, resume_step)
            self._sinks.append(jsonl)
            if tensorboard:
                self._sinks.append(TensorBoardSink(self.run_dir, resume_step, jsonl.kept))
            if trackers is not None and (_wants_wandb(trackers) or trackers.mlflow):
                self._start_trackers(trackers, _config_dict(config), resume_step is not None)
        except BaseException:
            self.close()
            raise

    def _start_trackers(self, spec: Any, config: dict, resume: bool) -> None:
        where = os.path.abspath(self.run_dir)
        name = os.path.basename(where)  # each run is named for its run_dir in both trackers
        experiment = spec.experiment or name
        if _wants_wandb(spec):
            self._sinks.append(WandbSink(self.run_dir, project=spec.wandb_project, mode=spec.wandb_mode,
                                         group=experiment, name=name, config=config, resume=resume))
        if spec.mlflow:
            uri = spec.mlflow_uri or pathlib.Path(where, "mlruns").as_uri()
            self._sinks.append(MlflowSink(self.run_dir, uri=uri, experiment=experiment, name=name,
                                          config=config, resume=resume))

    def log(self, step: int, metrics: Mapping[str, Any], *, phase: str = "train") -> None:
        if not self.enabled:
            return
        if self._sinks is None:
            raise RuntimeError("MetricsLogger.log after close()")
        clash = [k for k in metrics if k in RESERVED_KEYS]
        if clash:
            raise ValueError(f"metric names {clash} clash with the reserved keys {list(RESERVED_KEYS)}")
        values = {str(k): _scalar(k, v) for k, v in metrics.items()}
        for sink in self._sinks:
            sink.log(int(step), values, phase)

    def close(self) -> None:
        """Close every sink, even when one fails; the first failure is raised after all."""
        sinks, self._sinks = self._sinks or [], None
        failure = None
        for sink in sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - the others must still close
                failure = failure or e
        if failure is not None:
            raise failure

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
