"""What a resume refuses, so a checkpoint is never overwritten or silently ignored: a missing
checkpoint that ``latest`` names, shards saved in another layout, a run shorter than its checkpoint."""
import json
import types
import warnings

import pytest

from meshrl.engine import checkpoint
from meshrl.engine.runtime.loop import run_loop
from meshrl.engine.runtime.config import RunConfigError


def _fake_checkpoint(run_dir, step, layouts=None):
    folder = run_dir / "checkpoints" / f"step_{step}"
    folder.mkdir(parents=True)
    host = {"step": step, "trainer_steps": {}}
    if layouts is not None:
        host["layouts"] = layouts
    (folder / "host_state.json").write_text(json.dumps(host))
    (run_dir / "checkpoints" / "latest").write_text(f"step_{step}")
    return folder


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    four = _fake_checkpoint(tmp_path, 4)
    (tmp_path / "checkpoints" / "step_8.tmp").mkdir()  # an interrupted save is no candidate
    assert checkpoint.latest(str(tmp_path)) == str(four)
    (tmp_path / "checkpoints" / "latest").write_text("step_6")
    with pytest.warns(UserWarning, match="names step_6, which is missing: resuming from .*step_4"):
        assert checkpoint.latest(str(tmp_path)) == str(four)
    (tmp_path / "checkpoints" / "step_6").mkdir()  # a folder without its host state: incomplete
    with pytest.warns(UserWarning, match="names step_6, which is incomplete .*: resuming from .*step_4"):
        assert checkpoint.latest(str(tmp_path)) == str(four)


def test_latest_naming_nothing_left_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert checkpoint.latest(str(tmp_path)) is None  # no checkpoint yet: a fresh start
    (tmp_path / "checkpoints" / "latest").write_text("step_9")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(checkpoint.CheckpointError, match="names step_9, which is missing, and no "
                                                             "other checkpoint is complete"):
            checkpoint.latest(str(tmp_path))


def test_a_checkpoint_loads_only_into_its_saved_layouts(tmp_path):
    tp2 = {"ranks": [0, 1], "tp": 2, "pp": 1, "dp": 1}
    ckpt = _fake_checkpoint(tmp_path, 3, layouts={"actor": tp2})
    tp1 = {"ranks": [0], "tp": 1, "pp": 1, "dp": 1}
    with pytest.raises(checkpoint.CheckpointError,
                       match="holds model actor in layout tp=2 pp=1 dp=1 on ranks 0-1; this run places "
                             "it in tp=1 pp=1 dp=1 on ranks 0-0"):
        checkpoint.load(str(ckpt), {}, {}, layouts={"actor": tp1})
    host = json.loads((ckpt / "host_state.json").read_text())
    checkpoint._check_layouts(str(ckpt), host, {"actor": tp2, "critic": tp1})  # same layout: loads
    checkpoint._check_layouts(str(ckpt), {"step": 3}, {"actor": tp1})  # saved before layouts were kept


def test_a_run_shorter_than_its_checkpoint_stops_before_saving(tmp_path):
    ctx = types.SimpleNamespace(start_step=6, host_state={}, cfg=types.SimpleNamespace(run_dir=str(tmp_path)))
    steps = []
    with pytest.raises(RunConfigError, match="sft.steps: this run stops after 4 steps but .* holds a "
                                             "checkpoint at step 6"):
        run_loop(ctx, 4, steps.append, desc="sft", limit_key="sft.steps")
    assert steps == []
    ctx.main = True  # a finished run started again returns its last evaluation, runs nothing
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 5, "phase": "train", "time": 1, "loss": 2.0}\n'
        '{"step": 6, "phase": "eval", "time": 2, "pass_rate": 0.5}\n')
    assert run_loop(ctx, 6, steps.append, desc="sft", limit_key="sft.steps") == {"pass_rate": 0.5}
    assert steps == []


def test_keep_checkpoints_removes_only_older_ones(tmp_path):
    stale = _fake_checkpoint(tmp_path, 9)  # from a run that went further: newer, never removed
    for step in range(1, 5):
        checkpoint.save(str(tmp_path), step, {}, {}, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_3", "step_4", "step_9"] and stale.exists()
    assert checkpoint.latest(str(tmp_path)).endswith("step_4")
    checkpoint.save(str(tmp_path), 5, {}, {}, {})  # keep=0: nothing removed
    assert (tmp_path / "checkpoints" / "step_3").exists()


def test_a_checkpoint_restores_every_random_generator(tmp_path):
    import random

    import numpy as np
    import torch

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    checkpoint.save(str(tmp_path), 1, {}, {}, {})
    after_save = draws()
    draws()  # the generators move on (a killed run's later steps)
    checkpoint.load(checkpoint.latest(str(tmp_path)), {}, {})
    assert draws() == after_save


def test_a_resume_on_other_training_data_is_refused(tmp_path):
    from meshrl.engine.runtime.loop import training_data
    ctx = types.SimpleNamespace(host_state={}, cfg=types.SimpleNamespace(
        run_dir=str(tmp_path), data=types.SimpleNamespace(train="train.jsonl")))
    assert training_data(ctx, [1, 2, 3]) == [1, 2, 3]
    assert ctx.host_state["data"] == {"train": "train.jsonl", "records": 3}  # saved with the state
    assert training_data(ctx, [4, 5, 6]) == [4, 5, 6]  # as many records: the same batch indices
    with pytest.raises(RunConfigError, match="data.train: train.jsonl now gives 2 records, but the run "
                                             "in .* was trained on 3"):
        training_data(ctx, [1, 2])
