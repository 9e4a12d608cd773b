"""One training step of a mixture-of-experts model (the SFT loss plus the load-balancing and z-losses)
in expert-parallel layouts gives the single-process step: the loss, the router losses and loads,
the gradient norm and every updated parameter shard. The single process runs the same microbatches
(every replica's, in order), since the router losses are per microbatch. Replicas with fewer
microbatches than their ep group's others run empty ones (no tokens, no contribution)."""
import pytest
import torch

from meshrl.engine.algorithms.calls import sft_call
from meshrl.engine.batch import pack, split_even
from meshrl.engine.model import build_stage
from meshrl.engine.train import OptimConfig, Trainer, global_token_count
from meshrl.parallel.layout import ParallelLayout
from meshrl.testing.tiny_models import make_tiny_hf

# (tp, pp, dp, ep), sequence parallel, ZeRO-1
LAYOUTS = [((1, 1, 2, 2), False, False), ((2, 1, 2, 2), True, True), ((1, 2, 2, 2), False, True),
           ((1, 1, 4, 4), False, False), ((1, 1, 4, 2), False, True)]


def _data():
    g = torch.Generator().manual_seed(11)
    lengths = [7, 12, 5, 9, 3, 11, 6, 8, 10]
    seqs = [torch.randint(3, 101, (n,), generator=g).tolist() for n in lengths]
    prompt = [2, 4, 1, 3, 1, 5, 2, 2, 3]
    return seqs, prompt


def _microbatches(dp, rank, pad):
    """Replica ``rank``'s microbatches: its contiguous share of the sequences, two to a microbatch
    (9 sequences: the replicas get different counts of microbatches)."""
    seqs, prompt = _data()
    mine = split_even(list(range(len(seqs))), dp)[rank]
    parts = [mine[i:i + 2] for i in range(0, len(mine), 2)]
    return [pack([seqs[i] for i in part], loss_from=[prompt[i] - 1 for i in part],
                 pad_to_multiple=pad) for part in parts]


def _step(path, sizes, sp, zero1, ref_dp=None, ref_pad=1):
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    tp, pp, dp, ep = sizes
    layout = ParallelLayout(ranks=list(range(world)), tp=tp, pp=pp, dp=dp, ep=ep)
    stage = build_stage(layout, model_dir=path, sequence_parallel=sp)
    cfg = OptimConfig(lr=1e-2, eps=1e-3, weight_decay=0.1, max_grad_norm=0.5, zero1=zero1,
                      router_aux_loss_coef=0.3, router_z_loss_coef=0.05)
    trainer = Trainer(stage, cfg)
    if ref_dp is None:
        mbs = _microbatches(dp, layout.dp_rank, tp if sp else 1)
    else:  # the single process: every replica's microbatches, in order (with the same filler
        # sequences sequence parallelism adds: they are routed, and count, like any token)
        mbs = [mb for r in range(ref_dp) for mb in _microbatches(ref_dp, r, ref_pad)]
    metrics = trainer.step(mbs, sft_call(global_token_count(mbs, layout)))
    params = {p.shard_spec.name: (p.shard_spec, p.detach().clone()) for p in stage.parameters()}
    return metrics, params


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return {kind: make_tiny_hf(kind, str(tmp_path_factory.mktemp(kind)), seed=12)
            for kind in ("qwen3_moe", "mixtral")}


@pytest.mark.parametrize("sizes,sp,zero1", LAYOUTS,
                         ids=lambda v: "tp%d-pp%d-dp%d-ep%d" % v if isinstance(v, tuple) else str(v))
def test_moe_train_step_matches_single_process(dist_pool, paths, sizes, sp, zero1):
    kinds = ("qwen3_moe", "mixtral") if sizes == (1, 1, 2, 2) else ("mixtral",)
    for kind in kinds:
        path = paths[kind]
        ref_metrics, ref = _step(path, (1, 1, 1, 1), False, False, ref_dp=sizes[2],
                                 ref_pad=sizes[0] if sp else 1)
        before = build_stage(ParallelLayout(ranks=[0]), model_dir=path)
        moved = [(p - ref[p.shard_spec.name][1]).abs().max().item() for p in before.parameters()]
        assert min(moved) > 1e-4 and ref_metrics["grad_norm"] > 0.5  # every tensor moved, clipped
        assert ref_metrics["router/aux_loss"] > 0 and ref_metrics["router/z_loss"] > 0
        world = sizes[0] * sizes[1] * sizes[2]
        results = dist_pool(world).run(_step, path, sizes, sp, zero1)
        for metrics, params in results:
            for key, want in ref_metrics.items():
                if key != "lr":
                    assert metrics[key] == pytest.approx(want, rel=1e-4, abs=1e-6), (kind, key)
            for name, (spec, local) in params.items():
                want = spec.slice_full(ref[name][1])[spec.local_valid_index()]
                got = local[spec.local_valid_index()]
                assert torch.allclose(got, want, atol=2e-6, rtol=0), (
                    kind, sizes, name, (got - want).abs().max().item())


def _lonely_step(path):
    """ep=2 on two replicas where replica 1 has no data: its train step and inference run empty
    microbatches beside replica 0's."""
    import torch.distributed as dist

    from meshrl.engine.algorithms.calls import logprobs_call
    from meshrl.engine.train import infer
    layout = ParallelLayout(ranks=list(range(dist.get_world_size())), dp=2, ep=2)
    stage = build_stage(layout, model_dir=path)
    trainer = Trainer(stage, OptimConfig(lr=1e-2, eps=1e-3, router_aux_loss_coef=0.3))
    mbs = _microbatches(1, 0, 1) if layout.dp_rank == 0 else []
    scored = infer(stage, mbs, logprobs_call())
    metrics = trainer.step(mbs, sft_call(global_token_count(mbs, layout)))
    params = {p.shard_spec.name: p.detach().clone() for p in stage.parameters()}
    return layout.dp_rank, [s.tolist() for s in scored], metrics, params


def test_a_replica_without_data_steps_with_its_ep_group(dist_pool, paths):
    from meshrl.engine.algorithms.calls import logprobs_call
    from meshrl.engine.train import infer
    path = paths["mixtral"]
    stage = build_stage(ParallelLayout(ranks=[0]), model_dir=path)
    mbs = _microbatches(1, 0, 1)
    want_scores = [s.tolist() for s in infer(stage, mbs, logprobs_call())]
    trainer = Trainer(stage, OptimConfig(lr=1e-2, eps=1e-3, router_aux_loss_coef=0.3))
    want = trainer.step(mbs, sft_call(global_token_count(mbs, stage.layout)))
    for rank, scored, metrics, params in dist_pool(2).run(_lonely_step, path):
        if rank == 1:
            assert scored == []
        else:
            assert len(scored) == len(want_scores)
            for got, exp in zip(scored, want_scores):
                assert got == pytest.approx(exp, abs=1e-5)
        for key in ("loss", "router/aux_loss", "grad_norm"):
            assert metrics[key] == pytest.approx(want[key], rel=1e-4), key
        for p in stage.parameters():
            name = p.shard_spec.name
            if name in params:
                assert torch.allclose(params[name], p.detach(), atol=2e-6), name
