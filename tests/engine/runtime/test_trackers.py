"""Weights & Biases (offline) and MLflow (file store) as MetricsLogger sinks, read back from what
each wrote: W&B's offline `.wandb` log through its own protobuf records, MLflow's store through
MlflowClient. Covers the shared `phase/name` keys, non-finite values left out, the config logged
once, resume continuing the stored run id, a fresh start getting a new one, and the one-line
config errors for an unknown W&B mode and for a tracker whose package is missing."""
import builtins
import glob
import json
import math
import os
import struct
import sys
import time

import pytest

from meshrl.engine.runtime.config import LogSpec, RunConfigError, load_run_config
from meshrl.engine.runtime.metrics import MLFLOW_ID_FILE, WANDB_ID_FILE, MetricsLogger, read_metrics

CONFIG = {"algorithm": "ppo", "ppo": {"batch_size": 8, "clip": [0.2, 0.28]}, "extra": {}}


def _log_steps(run_dir, steps, spec, *, offset=0.0, resume_step=None, tensorboard=False):
    """As the runtime logs: train at the step's index s (with a NaN metric), an evaluation after
    every second step at the count of steps done."""
    with MetricsLogger(run_dir, tensorboard=tensorboard, resume_step=resume_step, trackers=spec,
                       config=CONFIG) as log:
        for s in steps:
            log.log(s, {"loss": s + offset, "tokens": 10 * s, "nan": math.nan})
            if (s + 1) % 2 == 0:
                log.log(s + 1, {"acc": s + 1 + offset}, phase="eval")


def _stored(run_dir, name):
    with open(os.path.join(run_dir, name), encoding="utf-8") as f:
        return f.read().strip()


# --- W&B: the offline run's .wandb file (LevelDB-style log of wandb_internal_pb2.Record) --------

_BLOCK = 32 * 1024  # the log's block size; a record's 7-byte header never straddles two blocks


def _wandb_records(path):
    """Every complete Record in one `.wandb` file, in write order (a tail being written is not)."""
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 7:
        return
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B transaction log"
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # the block's tail is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (kind == 0 and length == 0) or pos + 7 + length > len(data):
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            yield record


def _key(item):
    return item.key or "/".join(item.nested_key)


def _wandb_runs(run_dir, count):
    """[(run record, config dict, history rows)] of the ``count`` offline runs under run_dir, oldest
    first. finish() returns once wandb-core has the run's exit record, and wandb-core writes the
    file's tail a moment later (at the latest when the process exits): wait for those tails."""
    deadline = time.monotonic() + 30
    while True:
        paths = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
        logs = [list(_wandb_records(p)) for p in paths]
        if len(logs) == count and all(log and log[-1].WhichOneof("record_type") == "exit" for log in logs):
            break
        assert time.monotonic() < deadline, f"{len(logs)} complete W&B run files, not {count}, after 30 s"
        time.sleep(0.05)
    runs = []
    for log in logs:
        [run] = [r.run for r in log if r.WhichOneof("record_type") == "run"]
        rows = [{_key(i): json.loads(i.value_json) for i in r.history.item}
                for r in log if r.WhichOneof("record_type") == "history"]
        config = {_key(u): json.loads(u.value_json) for u in run.config.update if _key(u) != "_wandb"}
        runs.append((run, config, rows))
    # by start time: a second start within the same second gets the directory name plus "-1"
    return sorted(runs, key=lambda r: r[0].start_time.ToNanoseconds())


def _series(rows, key):
    return [(row["_step"], row[key]) for row in rows if key in row]


def test_wandb_offline_round_trip_keys_match_tensorboard_and_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = tmp_path / "ppo-small"
    _log_steps(run_dir, range(4), LogSpec(wandb=True, experiment="sweep-1"), tensorboard=True)

    [(run, config, rows)] = _wandb_runs(run_dir, 1)
    assert run.run_id == _stored(run_dir, WANDB_ID_FILE)
    assert (run.project, run.run_group, run.display_name) == ("meshrl", "sweep-1", "ppo-small")
    assert config == CONFIG  # the run's config, once, as W&B's run config
    assert _series(rows, "train/loss") == [(s, s) for s in range(4)]
    assert _series(rows, "train/tokens") == [(s, 10 * s) for s in range(4)]
    assert _series(rows, "eval/acc") == [(2, 2), (4, 4)]
    logged = {k for row in rows for k in row if not k.startswith("_")}
    assert "train/nan" not in logged  # non-finite: left out of the tracker (null in the JSONL)
    assert [r["nan"] for r in read_metrics(run_dir) if r["phase"] == "train"] == [None] * 4

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == logged == {"train/loss", "train/tokens", "eval/acc"}


def test_wandb_resume_continues_the_stored_run_id_and_a_fresh_start_gets_a_new_one(tmp_path):
    spec = LogSpec(wandb=True)
    _log_steps(tmp_path, range(4), spec)
    first = _stored(tmp_path, WANDB_ID_FILE)
    # checkpoint 2: the resumed run logs steps 2 and 3 again, under the same id
    _log_steps(tmp_path, range(2, 4), spec, offset=100.0, resume_step=2)
    assert _stored(tmp_path, WANDB_ID_FILE) == first
    runs = _wandb_runs(tmp_path, 2)
    assert [run.run_id for run, _, _ in runs] == [first, first]  # `wandb sync --id` joins them
    assert _series(runs[1][2], "train/loss") == [(2, 102), (3, 103)]
    assert _series(runs[1][2], "eval/acc") == [(4, 104)]

    _log_steps(tmp_path, range(1), spec)  # no resume_step: a new run, as metrics.jsonl starts anew
    fresh = _stored(tmp_path, WANDB_ID_FILE)
    assert fresh != first and [run.run_id for run, _, _ in _wandb_runs(tmp_path, 3)][-1] == fresh


def test_wandb_mode_disabled_writes_nothing_and_needs_no_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails
    _log_steps(tmp_path, range(2), LogSpec(wandb=True, wandb_mode="disabled"))
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


# --- MLflow: the file store, read back through MlflowClient -------------------------------------

def _mlflow(run_dir, monkeypatch, uri=None):
    """A client on the run's store (default: file:RUN_DIR/mlruns) and the stored run id."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 gates its file store on it
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient
    uri = uri or (run_dir / "mlruns").resolve().as_uri()
    return MlflowClient(tracking_uri=uri), _stored(run_dir, MLFLOW_ID_FILE)


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_mlflow_file_store_round_trip(tmp_path, monkeypatch):
    run_dir = tmp_path / "dpo-small"
    _log_steps(run_dir, range(4), LogSpec(mlflow=True))

    client, run_id = _mlflow(run_dir, monkeypatch)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "dpo-small"
    assert client.get_experiment(run.info.experiment_id).name == "dpo-small"  # default: basename
    assert _history(client, run_id, "train/loss") == [(s, float(s)) for s in range(4)]
    assert _history(client, run_id, "train/tokens") == [(s, 10.0 * s) for s in range(4)]
    assert _history(client, run_id, "eval/acc") == [(2, 2.0), (4, 4.0)]
    assert _history(client, run_id, "train/nan") == []  # non-finite: left out
    assert set(run.data.metrics) == {"train/loss", "train/tokens", "eval/acc"}
    assert run.data.params == {"algorithm": "ppo", "ppo.batch_size": "8", "ppo.clip": "[0.2, 0.28]",
                               "extra": "{}"}
    assert run.data.tags["meshrl.run_dir"] == str(run_dir.resolve())
    with open(client.download_artifacts(run_id, "config.yaml", str(tmp_path)), encoding="utf-8") as f:
        assert "batch_size: 8" in f.read()


def test_mlflow_resume_continues_the_stored_run_and_a_fresh_start_creates_one(tmp_path, monkeypatch):
    uri = (tmp_path / "store").resolve().as_uri()
    spec = LogSpec(mlflow=True, mlflow_uri=uri, experiment="grid")
    run_dir = tmp_path / "run"
    _log_steps(run_dir, range(4), spec)
    client, first = _mlflow(run_dir, monkeypatch, uri)
    assert not (run_dir / "mlruns").exists()  # logging.mlflow_uri is where it went

    _log_steps(run_dir, range(2, 4), spec, offset=100.0, resume_step=2)
    assert _stored(run_dir, MLFLOW_ID_FILE) == first
    # the killed run's points after its checkpoint stay in MLflow; the resumed ones follow
    assert _history(client, first, "train/loss") == [(0, 0.0), (1, 1.0), (2, 2.0), (2, 102.0),
                                                     (3, 3.0), (3, 103.0)]
    assert client.get_run(first).info.status == "FINISHED"
    assert client.get_run(first).data.params["ppo.batch_size"] == "8"  # logged once, not again

    _log_steps(run_dir, range(1), spec)
    fresh = _stored(run_dir, MLFLOW_ID_FILE)
    assert fresh != first and _history(client, fresh, "train/loss") == [(0, 0.0)]
    experiment = client.get_experiment_by_name("grid")
    assert client.get_run(fresh).info.experiment_id == experiment.experiment_id


def test_mlflow_leaves_out_a_name_it_rejects_and_keeps_the_others(tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match="train/pass@1"):
        with MetricsLogger(tmp_path, tensorboard=False, trackers=LogSpec(mlflow=True)) as log:
            log.log(0, {"pass@1": 0.5, "loss": 1.0})
            log.log(1, {"pass@1": 0.25, "loss": 0.5})
    client, run_id = _mlflow(tmp_path, monkeypatch)
    assert _history(client, run_id, "train/loss") == [(0, 1.0), (1, 0.5)]
    assert [r["pass@1"] for r in read_metrics(tmp_path)] == [0.5, 0.25]


# --- config errors -------------------------------------------------------------------------------

BASE = ["algorithm=sft", "data.train=train.jsonl"]


def _one_line_error(overrides):
    with pytest.raises(RunConfigError) as info:
        load_run_config(None, BASE + overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_wandb_mode_is_a_one_line_config_error(tmp_path):
    assert _one_line_error(["logging.wandb_mode=onlin"]) == \
        "logging.wandb_mode=onlin: use one of offline, online, disabled"
    with pytest.raises(RunConfigError, match="logging.wandb_mode=dryrun: use one of"):
        MetricsLogger(tmp_path / "run", trackers=LogSpec(wandb=True, wandb_mode="dryrun"))
    assert not (tmp_path / "run").exists()  # refused before any file was touched


@pytest.mark.parametrize("key,package", [("wandb", "wandb"), ("mlflow", "mlflow-skinny")])
def test_missing_tracker_package_is_a_config_error_before_anything_runs(tmp_path, monkeypatch, key,
                                                                        package):
    monkeypatch.setitem(sys.modules, key, None)  # the package is not installed
    fix = f"pip install {package} (or meshrl[trackers]), or set logging.{key}=false"
    assert _one_line_error([f"logging.{key}=true"]) == \
        f"logging.{key}=true: the {key} package is not installed: {fix}"
    assert load_run_config(None, BASE).logging.tensorboard  # not asked for: no error
    with pytest.raises(RunConfigError, match=f"logging.{key}=true: the {key} package is not installed"):
        MetricsLogger(tmp_path / "run", trackers=LogSpec(**{key: True}))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,package", [("wandb", "wandb"), ("mlflow", "mlflow-skinny")])
def test_tracker_import_failing_at_logger_start_is_a_config_error(tmp_path, monkeypatch, key, package):
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == key or name.startswith(key + "."):
            raise ImportError(f"simulated: no {key} here")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m == key or m.startswith(key + ".")]:
        monkeypatch.delitem(sys.modules, name)  # so the sink's import runs again, and fails
    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(RunConfigError) as info:
        MetricsLogger(tmp_path, tensorboard=False, trackers=LogSpec(**{key: True}))
    assert str(info.value) == (f"logging.{key}=true: importing {key} failed (simulated: no {key} here): "
                               f"pip install {package} (or meshrl[trackers]), or set logging.{key}=false")
