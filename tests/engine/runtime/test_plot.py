import argparse
import math
import os
import struct

import numpy as np
import pytest
from matplotlib.image import imread

from meshrl.engine.runtime.metrics import MetricsLogger
from meshrl.engine.runtime.plot import add_arguments, compare_runs, plot_run, run, run_labels, smooth

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _assert_real_plot(path, min_width=400, min_height=250):
    width, height = _png_size(path)
    assert width >= min_width and height >= min_height
    # A blank or near-blank canvas compresses to well under 5 KB; curves, ticks and text do not.
    assert os.path.getsize(path) > 5_000
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width)
    assert np.std(pixels[..., :3]) > 0.02  # something other than background was drawn


def _make_run(run_dir, *, scale=1.0, seed=0, with_reward=True):
    rng = np.random.default_rng(seed)
    with MetricsLogger(run_dir, tensorboard=False) as log:
        for s in range(30):
            m = {"loss": scale * math.exp(-s / 10) + 0.05 * rng.standard_normal(),
                 "kl": 0.01 * s, "tokens": 512}
            if with_reward:
                m["reward"] = scale * s / 30 + 0.1 * rng.standard_normal()
            if s == 7:
                m["loss"] = math.nan  # a diverged step must not break the plot
            log.log(s, m)
            if s % 10 == 0:
                log.log(s, {"pass_rate": s / 40}, phase="eval")
    return run_dir


def test_smooth_is_debiased_ema_holding_over_nans():
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])
    assert smooth([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)  # debiasing: no pull towards 0
    out = smooth([math.nan, 1.0, math.nan, 1.0], 0.6)
    assert math.isnan(out[0]) and out[1:] == pytest.approx([1.0, 1.0, 1.0])
    assert smooth([1.0, 5.0], 0.0) == [1.0, 5.0]
    with pytest.raises(ValueError):
        smooth([1.0], 1.0)


def test_plot_run_writes_one_png_per_phase(tmp_path):
    run_dir = _make_run(tmp_path / "ppo")
    paths = plot_run(run_dir)
    assert paths == [str(run_dir / "plots" / "train.png"), str(run_dir / "plots" / "eval.png")]
    for p in paths:
        _assert_real_plot(p)
    train_w, train_h = _png_size(paths[0])
    eval_w, _ = _png_size(paths[1])
    assert train_w > 2 * eval_w  # 3-column grid of 4 metrics vs a single subplot
    assert train_h > 500  # two rows


def test_plot_run_metric_selection_and_errors(tmp_path):
    run_dir = _make_run(tmp_path / "ppo")
    paths = plot_run(run_dir, tmp_path / "out", metrics="reward, pass_rate")
    assert [os.path.basename(p) for p in paths] == ["train.png", "eval.png"]
    assert _png_size(paths[0])[0] < 600  # one subplot only
    assert plot_run(run_dir, tmp_path / "out2", metrics=["kl"]) == [str(tmp_path / "out2" / "train.png")]
    with pytest.raises(ValueError, match="no metric named rewrd; available: kl, loss"):
        plot_run(run_dir, metrics="rewrd")
    assert plot_run(run_dir, tmp_path / "out3", metrics="rewrd,kl", strict=False) == [
        str(tmp_path / "out3" / "train.png")]
    empty = tmp_path / "empty"
    MetricsLogger(empty, tensorboard=False).close()
    with pytest.raises(ValueError, match="no metrics"):
        plot_run(empty)


def test_compare_runs_overlays_one_metric(tmp_path):
    runs = [_make_run(tmp_path / "study" / algo / "seed0", scale=k + 1, seed=k)
            for k, algo in enumerate(["ppo", "dpo"])]
    assert run_labels(runs) == [os.path.join("ppo", "seed0"), os.path.join("dpo", "seed0")]
    out = compare_runs(runs, tmp_path / "cmp" / "reward.png", "reward")
    assert out == str(tmp_path / "cmp" / "reward.png")
    _assert_real_plot(out)
    no_reward = _make_run(tmp_path / "sft", with_reward=False)
    with pytest.warns(UserWarning, match="left out"):
        compare_runs(runs + [no_reward], tmp_path / "cmp2.png", "reward", labels=["a", "b", "c"])
    _assert_real_plot(tmp_path / "cmp2.png")
    with pytest.raises(ValueError, match="none of the runs"), pytest.warns(UserWarning):
        compare_runs([no_reward], tmp_path / "cmp3.png", "reward")


def _cli(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return run(p.parse_args(argv))


def test_cli_single_and_several_runs(tmp_path, capsys):
    a = _make_run(tmp_path / "a", seed=1)
    b = _make_run(tmp_path / "b", seed=2, with_reward=False)
    assert _cli([str(a)]) == 0
    assert capsys.readouterr().out.split() == [str(a / "plots" / "train.png"), str(a / "plots" / "eval.png")]
    with pytest.raises(ValueError, match="--out"):
        _cli([str(a), str(b)])
    out = tmp_path / "cmp"
    assert _cli([str(a), str(b), "--out", str(out), "--metrics", "loss,kl"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(os.path.relpath(p, out) for p in printed) == sorted([
        os.path.join("a", "train.png"), os.path.join("b", "train.png"),
        "compare_train_loss.png", "compare_train_kl.png"])
    # Without --metrics, compare what every run logged in the phase: reward is only in a.
    assert _cli([str(a), str(b), "--out", str(tmp_path / "all")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(os.path.basename(p) for p in printed if "compare_" in p) == [
        "compare_train_kl.png", "compare_train_loss.png", "compare_train_tokens.png"]
