"""Checkpoint and resume (DCP): resuming reproduces the uninterrupted run exactly."""
import torch

from meshrl.engine import checkpoint
from meshrl.engine.batch import pack, split_even
from meshrl.engine.model import build_stage
from meshrl.engine.algorithms.calls import sft_call
from meshrl.engine.train import OptimConfig, Trainer, global_token_count
from meshrl.parallel.layout import ParallelLayout
from meshrl.testing.tiny_models import make_tiny_hf


def _batches(step, dp_rank, dp):
    g = torch.Generator().manual_seed(100 + step)
    seqs = [torch.randint(3, 101, (int(n),), generator=g).tolist() for n in (5, 9, 7, 4)]
    mine = split_even(seqs, dp)[dp_rank]
    return [pack(part) for part in split_even(mine, 2)]


def _run(path, run_dir, tp, pp, dp, steps, resume):
    import torch.distributed as dist
    layout = ParallelLayout(ranks=list(range(dist.get_world_size())), tp=tp, pp=pp, dp=dp)
    stage = build_stage(layout, model_dir=path)
    trainer = Trainer(stage, OptimConfig(lr=3e-3, zero1=True, warmup_steps=3, schedule="cosine",
                                         total_steps=6))
    start = 0
    if resume:
        host = checkpoint.load(checkpoint.latest(run_dir), {"actor": stage}, {"actor": trainer})
        start = host["step"]
    losses = []
    for step in range(start, steps):
        mbs = _batches(step, layout.dp_rank, dp)
        losses.append(trainer.step(mbs, sft_call(global_token_count(mbs, layout)))["loss"])
        if step == 1 and not resume:
            checkpoint.save(run_dir, step + 1, {"actor": stage}, {"actor": trainer}, {"note": "x"})
    return losses, {p.shard_spec.name: p.detach().clone() for p in stage.parameters()}


def test_resume_reproduces_uninterrupted_run(dist_pool, tmp_path):
    path = make_tiny_hf("llama", str(tmp_path / "m"), seed=13)
    pool = dist_pool(4)
    full = pool.run(_run, path, str(tmp_path / "run"), 2, 1, 2, 5, False)
    resumed = pool.run(_run, path, str(tmp_path / "run"), 2, 1, 2, 5, True)
    assert checkpoint.latest(str(tmp_path / "run")).endswith("step_2")
    for (l_full, p_full), (l_res, p_res) in zip(full, resumed):
        assert l_res == l_full[2:]  # bit-identical: same data, same state, same arithmetic
        for name in p_full:
            assert torch.equal(p_full[name], p_res[name]), name
