import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from meshrl.engine.runtime.metrics import (MetricsLogger, format_metrics, progress, read_metrics,
                                           summarize)


def _lines(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return f.read().splitlines()


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return None
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_jsonl_line_per_log_flushed_before_close(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(0, {"loss": 2.5, "tokens": 128})
        log.log(1, {"loss": torch.tensor(1.25)}, phase="eval")
        # Read by a second handle while the logger is open: each line is already flushed.
        lines = _lines(tmp_path)
        assert len(lines) == 2
        first, second = json.loads(lines[0]), json.loads(lines[1])
        assert list(first) == ["step", "phase", "time", "loss", "tokens"]
        assert first["step"] == 0 and first["phase"] == "train" and first["loss"] == 2.5
        assert first["tokens"] == 128 and isinstance(first["tokens"], int)
        assert second == {"step": 1, "phase": "eval", "time": second["time"], "loss": 1.25}
        assert abs(second["time"] - first["time"]) < 60
    assert read_metrics(tmp_path) == [first, second]


def test_lines_survive_sigkill(tmp_path):
    code = (
        "import os, signal, sys\n"
        "from meshrl.engine.runtime.metrics import MetricsLogger\n"
        "log = MetricsLogger(sys.argv[1], tensorboard=False)\n"
        "for s in range(3): log.log(s, {'x': float(s)})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    assert [r["x"] for r in read_metrics(tmp_path)] == [0.0, 1.0, 2.0]


def test_disabled_rank_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, enabled=False) as log:
        log.log(0, {"loss": 1.0})
    assert not run_dir.exists()


def test_non_finite_values_are_null_in_json_and_absent_from_tensorboard(tmp_path):
    with MetricsLogger(tmp_path) as log:
        log.log(3, {"nan": math.nan, "inf": float("inf"), "ninf": torch.tensor(-math.inf), "ok": 0.5})
    line = _lines(tmp_path)[0]
    assert "NaN" not in line and "Infinity" not in line  # strict JSON, readable by any parser
    rec = json.loads(line)
    assert rec["nan"] is None and rec["inf"] is None and rec["ninf"] is None and rec["ok"] == 0.5
    assert _scalars(tmp_path, "train/ok") == [(3, 0.5)]
    assert _scalars(tmp_path, "train/nan") is None and _scalars(tmp_path, "train/inf") is None


def test_bad_metric_names_and_values_are_errors(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        with pytest.raises(ValueError, match="reserved"):
            log.log(0, {"step": 1.0})
        with pytest.raises(ValueError, match="not a number"):
            log.log(0, {"name": "abc"})
    with pytest.raises(RuntimeError, match="close"):
        log.log(1, {"x": 1.0})


def test_tensorboard_scalars_tagged_phase_slash_name(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for step in range(4):
            log.log(step, {"loss": 1.0 / (step + 1)})
        log.log(3, {"acc": 0.75}, phase="eval")
    assert _scalars(tmp_path, "train/loss") == [(s, pytest.approx(1.0 / (s + 1))) for s in range(4)]
    assert _scalars(tmp_path, "eval/acc") == [(3, 0.75)]


def _log_range(run_dir, steps, offset=0.0, resume_step=None):
    """As the runtime logs: train lines at the step's 0-based index s, an evaluation after every
    second step at the count of steps done (s + 1), before that step's checkpoint."""
    with MetricsLogger(run_dir, resume_step=resume_step) as log:
        for s in steps:
            log.log(s, {"x": s + offset})
            if (s + 1) % 2 == 0:
                log.log(s + 1, {"acc": s + 1 + offset}, phase="eval")


def test_resume_truncates_after_checkpoint_step_and_purges_tensorboard(tmp_path):
    _log_range(tmp_path, range(10))
    before = _lines(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 10, "phase": "tr')  # the killed run died mid-write
    # checkpoint 4: steps 0..3 done and the evaluation at 4; the resumed run logs step 4 again
    _log_range(tmp_path, range(4, 8), offset=100.0, resume_step=4)

    lines = _lines(tmp_path)
    kept = before[:6]  # train 0, 1, eval 2, train 2, 3, eval 4
    assert [json.loads(ln)["step"] for ln in kept] == [0, 1, 2, 2, 3, 4]
    assert lines[:len(kept)] == kept  # kept lines are byte-identical
    train = [(r["step"], r["x"]) for r in read_metrics(tmp_path) if r["phase"] == "train"]
    assert train == [(s, float(s)) for s in range(4)] + [(s, s + 100.0) for s in range(4, 8)]
    evals = [(r["step"], r["acc"]) for r in read_metrics(tmp_path) if r["phase"] == "eval"]
    assert evals == [(2, 2.0), (4, 4.0), (6, 106.0), (8, 108.0)]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "tensorboard"]  # no temp file left

    assert _scalars(tmp_path, "train/x") == train
    assert _scalars(tmp_path, "eval/acc") == evals


def test_fresh_start_discards_an_earlier_runs_lines(tmp_path):
    _log_range(tmp_path, range(6))
    _log_range(tmp_path, range(3), offset=50.0)
    train = [(r["step"], r["x"]) for r in read_metrics(tmp_path) if r["phase"] == "train"]
    assert train == [(0, 50.0), (1, 51.0), (2, 52.0)]
    assert _scalars(tmp_path, "train/x") == train


def test_read_metrics_tolerates_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "phase": "train", "x": 1}\n{"step": 1, "pha')
    assert read_metrics(tmp_path) == [{"step": 0, "phase": "train", "x": 1}]
    assert read_metrics(path) == read_metrics(tmp_path)
    path.write_text('{"step": 0, "ph\n{"step": 1, "phase": "train", "x": 1}\n')
    with pytest.raises(ValueError, match=":1: malformed"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "missing")


def test_summarize_first_and_last_window_means(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for s in range(12):
            log.log(s, {"reward": float(s), "gap": math.nan if s == 11 else 1.0})
        log.log(11, {"acc": 0.5}, phase="eval")
        log.log(12, {"dead": math.nan})
    got = summarize(tmp_path)
    assert got["train"]["reward"] == {"n": 12, "last": 11.0, "first_mean": 2.0, "last_mean": 9.0,
                                      "delta": 7.0}
    assert got["train"]["gap"]["n"] == 11 and got["train"]["gap"]["last"] == 1.0  # NaN skipped
    assert got["eval"]["acc"] == {"n": 1, "last": 0.5, "first_mean": 0.5, "last_mean": 0.5, "delta": 0.0}
    assert got["train"]["dead"]["n"] == 0 and math.isnan(got["train"]["dead"]["last_mean"])
    assert summarize(tmp_path, window=2)["train"]["reward"]["last_mean"] == 10.5


def test_format_metrics_picks_and_formats_a_few():
    m = {"loss": 0.123456789, "reward": torch.tensor(12345.678), "kl": None, "lr": 1e-5, "extra": 1.0}
    assert format_metrics(m) == {"loss": "0.1235", "reward": "1.235e+04", "kl": "nan", "lr": "1e-05"}
    assert format_metrics(m, keys=["lr", "missing", "loss"]) == {"lr": "1e-05", "loss": "0.1235"}
    assert list(format_metrics(m, limit=2)) == ["loss", "reward"]


def test_progress_bar_shows_metrics_and_can_be_disabled():
    buf = io.StringIO()
    with progress(3, desc="ppo", file=buf) as bar:
        bar.show({"reward": 0.5, "kl": 0.01})
        bar.update(1)
    assert "ppo" in buf.getvalue() and "reward=0.5" in buf.getvalue() and "kl=0.01" in buf.getvalue()
    quiet = io.StringIO()
    with progress(3, desc="ppo", enabled=False, file=quiet) as bar:
        bar.show({"reward": 0.5})
        bar.update(3)
    assert bar.disable and quiet.getvalue() == ""
