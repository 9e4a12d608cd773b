"""One training step with several microbatches gives, in every layout, the loss and the updated
full parameters of the single-process step; ZeRO-1 and plain DP agree."""
import pytest
import torch

from meshrl.engine.batch import pack, split_even
from meshrl.engine.model import build_stage
from meshrl.engine.algorithms.calls import sft_call
from meshrl.engine.train import OptimConfig, Trainer, global_token_count
from meshrl.parallel.layout import ParallelLayout
from meshrl.testing.tiny_models import make_tiny_hf

LAYOUTS = [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2), (2, 2, 2)]


def _data():
    g = torch.Generator().manual_seed(11)
    lengths = [7, 12, 5, 9, 3, 11, 6, 8]
    seqs = [torch.randint(3, 101, (n,), generator=g).tolist() for n in lengths]
    prompt = [2, 4, 1, 3, 1, 5, 2, 2]
    return seqs, prompt


def _step(path, tp, pp, dp, zero1, sp=False, ckpt=False):
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout = ParallelLayout(ranks=list(range(world)), tp=tp, pp=pp, dp=dp)
    stage = build_stage(layout, model_dir=path, sequence_parallel=sp, activation_checkpointing=ckpt)
    # large eps: Adam's first step is lr·g/(|g|+eps); a tiny eps would turn it into lr·sign(g),
    # where round-off on near-zero gradients could flip signs between layouts
    cfg = OptimConfig(lr=1e-2, eps=1e-3, weight_decay=0.1, max_grad_norm=0.5, zero1=zero1)
    trainer = Trainer(stage, cfg)
    seqs, prompt = _data()
    mine = split_even(list(range(len(seqs))), dp)[layout.dp_rank]
    mbs = [pack([seqs[i] for i in part], loss_from=[prompt[i] - 1 for i in part],
                pad_to_multiple=tp if sp else 1)
           for part in split_even(mine, 2)]
    metrics = trainer.step(mbs, sft_call(global_token_count(mbs, layout)))
    params = {p.shard_spec.name: (p.shard_spec, p.detach().clone()) for p in stage.parameters()}
    return metrics, params


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = make_tiny_hf("qwen2", str(tmp_path_factory.mktemp("train")), seed=12)
    metrics, params = _step(path, 1, 1, 1, False)
    before = build_stage(ParallelLayout(ranks=[0]), model_dir=path)
    moved = [(p - params[p.shard_spec.name][1]).abs().max().item() for p in before.parameters()]
    assert min(moved) > 1e-4 and metrics["grad_norm"] > 0.5  # every tensor moved; clipping active
    return path, metrics, {n: t for n, (_, t) in params.items()}


def _check(results, ref_metrics, ref_params, what):
    for metrics, params in results:
        # fp32; different summation orders (tp/dp sums, microbatch split) only
        assert abs(metrics["loss"] - ref_metrics["loss"]) < 1e-5, (what, metrics, ref_metrics)
        assert abs(metrics["grad_norm"] - ref_metrics["grad_norm"]) < 1e-4 * ref_metrics["grad_norm"]
        for name, (spec, local) in params.items():
            want = spec.slice_full(ref_params[name])[spec.local_valid_index()]
            got = local[spec.local_valid_index()]
            assert torch.allclose(got, want, atol=2e-6, rtol=0), (what, name,
                                                                 (got - want).abs().max().item())


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "tp%d-pp%d-dp%d" % l)
def test_train_step_matches_single_process(dist_pool, reference, layout):
    path, ref_metrics, ref_params = reference
    tp, pp, dp = layout
    for zero1 in ([False, True] if dp > 1 else [False]):
        results = dist_pool(tp * pp * dp).run(_step, path, tp, pp, dp, zero1)
        _check(results, ref_metrics, ref_params, (layout, zero1))


def test_sequence_parallel_and_activation_checkpointing(dist_pool, reference):
    path, ref_metrics, ref_params = reference
    results = dist_pool(4).run(_step, path, 2, 2, 1, False, True, True)
    _check(results, ref_metrics, ref_params, "sp+ckpt")


def _critic_step(path, tp, sp):
    """A value-head (critic) step: squared error of per-token values against fixed targets."""
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout = ParallelLayout(ranks=list(range(world)), tp=tp)
    stage = build_stage(layout, model_dir=path, head="value", sequence_parallel=sp, seed=5)
    with torch.no_grad():  # a non-zero head, so the gradient reaches the trunk
        stage.score.weight.copy_(torch.linspace(-0.1, 0.1, stage.score.weight.numel()).view(1, -1))
    trainer = Trainer(stage, OptimConfig(lr=1e-2, eps=1e-3))
    seqs, _ = _data()
    mb = pack(seqs[:4], pad_to_multiple=2)  # the same packing (filler included) in every layout
    target = torch.linspace(-1, 1, mb.num_tokens)
    real = mb.tokens["loss_mask"] > -1  # every position, filler included (same on every layout)
    n = float(mb.num_tokens)

    def loss(st, h, b):
        err = ((st.values(h) - target) ** 2)[real].sum() / n
        return err, {"loss": err.detach()}
    m = trainer.step([mb], loss)
    return m, {p.shard_spec.name: (p.shard_spec, p.detach().clone()) for p in stage.parameters()}


def test_critic_step_with_sequence_parallel_matches_single_process(dist_pool, reference):
    path = reference[0]
    ref_m, ref_p = _critic_step(path, 1, False)
    for metrics, params in dist_pool(2).run(_critic_step, path, 2, True):
        assert abs(metrics["loss"] - ref_m["loss"]) < 1e-5
        # without the SP-aware gather the value gradient would be tp times too large
        assert abs(metrics["grad_norm"] - ref_m["grad_norm"]) < 1e-4 * ref_m["grad_norm"]
        for name, (spec, local) in params.items():
            want = spec.slice_full(ref_p[name][1])[spec.local_valid_index()]
            assert torch.allclose(local[spec.local_valid_index()], want, atol=2e-6, rtol=0), name
