"""GRPO normalisation and loss, RunningMoments (one process and two gloo ranks), EMA update."""
import math

import pytest
import torch
import torch.distributed as dist

from meshrl.engine.algorithms.losses import (RunningMoments, ema_update_, group_normalize,
                                             grpo_policy_loss)

f64 = dict(dtype=torch.float64)


def test_group_normalize_uses_the_sample_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0], **f64)
    out = group_normalize(r, group_size=4)
    # Group 1: mean ½, sample std √(4·¼/3) = 1/√3, so ±½·√3; the population std would give ±1.
    h = 0.5 * math.sqrt(3.0)
    assert out[:4].tolist() == pytest.approx([h, -h, -h, h], rel=1e-5)
    assert out[4:].tolist() == [0.0] * 4  # all equal: no signal, not NaN
    assert group_normalize(torch.tensor([0.0, 1.0]), 2).tolist() == pytest.approx(
        [-1 / math.sqrt(2), 1 / math.sqrt(2)], rel=1e-5)


@pytest.mark.parametrize("rewards, size", [(torch.zeros(4), 1), (torch.zeros(6), 4),
                                           (torch.zeros(2, 2), 2)])
def test_group_normalize_rejects_bad_shapes(rewards, size):
    with pytest.raises(ValueError):
        group_normalize(rewards, size)


def test_grpo_policy_loss_hand_worked():
    old = torch.tensor([-1.0, -1.0], **f64)
    logp = old.clone().requires_grad_(True)  # ratio 1: the clip is inactive
    ref = torch.tensor([-1.0 - math.log(2.0), -1.0], **f64)  # π_ref/π = ½ and 1
    adv = torch.tensor([1.0, -1.0], **f64)
    loss, m = grpo_policy_loss(logp, old, ref, adv, kl_coef=0.04)
    k3 = math.log(2.0) - 0.5  # ½ − ln ½ − 1
    assert loss.item() == pytest.approx((-1.0 + 0.04 * k3 + 1.0) / 2, rel=1e-12)
    assert m["kl"].item() == pytest.approx(k3 / 2, rel=1e-12)
    loss.backward()
    # d k3 / d logp = 1 − π_ref/π: ½ for token 0, 0 for token 1.
    assert logp.grad.tolist() == pytest.approx([(-1.0 + 0.04 * 0.5) / 2, 1.0 / 2])


def test_running_moments_chan_merge_matches_the_concatenation():
    rm = RunningMoments()
    assert rm.update(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx((2.5, math.sqrt(1.25)))
    rm.update(torch.tensor([10.0, 99.0]), mask=torch.tensor([True, False]))
    # {1, 2, 3, 4, 10}: mean 4, population variance (9 + 4 + 1 + 0 + 36)/5 = 10.
    assert (rm.mean, rm.var, rm.count) == pytest.approx((4.0, 10.0, 5.0))
    g = torch.Generator().manual_seed(0)
    chunks = [1e4 + torch.randn(n, generator=g, **f64) for n in (7, 1, 30)]
    rm = RunningMoments()
    for c in chunks:
        rm.update(c)
    allx = torch.cat(chunks)
    assert rm.mean == pytest.approx(allx.mean().item(), rel=1e-12)
    assert rm.std == pytest.approx(allx.std(unbiased=False).item(), rel=1e-9)
    x = torch.tensor([3.0, 5.0], **f64)
    torch.testing.assert_close(rm.denormalize(rm.normalize(x)), x)
    clone = RunningMoments()
    clone.load_state_dict(rm.state_dict())
    assert (clone.mean, clone.std) == (rm.mean, rm.std)


def _moments_on_rank():
    rank = dist.get_rank()
    rm = RunningMoments()
    data = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0])][rank]
    batch = rm.update(data, group=dist.group.WORLD)
    return batch, rm.mean, rm.var


def test_running_moments_all_reduce_over_two_ranks(dist_pool):
    out = dist_pool(2).run(_moments_on_rank)
    # {1, 2, 3, 10}: mean 4, population variance (9 + 4 + 1 + 36)/4 = 12.5, on both ranks.
    for batch, mean, var in out:
        assert batch == pytest.approx((4.0, math.sqrt(12.5)))
        assert (mean, var) == pytest.approx((4.0, 12.5))


def test_ema_update_in_place_on_parameters():
    ref = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([5.0]))]
    actor = [torch.tensor([3.0, 0.0]), torch.tensor([-5.0])]
    ids = [id(p) for p in ref]
    ema_update_(ref, actor, alpha=0.9)
    assert [id(p) for p in ref] == ids
    assert ref[0].tolist() == pytest.approx([1.2, 1.8])
    assert ref[1].tolist() == pytest.approx([4.0])
    ema_update_(ref, actor, alpha=0.0)
    assert ref[0].tolist() == [3.0, 0.0]


def test_ema_update_bf16_rounds_once_from_fp32():
    ref = torch.tensor([1.0, 256.0], dtype=torch.bfloat16)
    actor = torch.tensor([1.5, 260.0], dtype=torch.bfloat16)
    ema_update_([ref], [actor], alpha=0.75)
    assert ref.dtype == torch.bfloat16
    # 1.125 is exact in bf16; 257 is not (ulp 2 at 256) and rounds to even: 256.
    assert ref.tolist() == [1.125, 256.0]


def test_ema_update_rejects_mismatches():
    with pytest.raises(ValueError, match="actor tensors"):
        ema_update_([torch.zeros(2)], [], alpha=0.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        ema_update_([torch.zeros(2)], [torch.zeros(2)], alpha=1.5)


def test_grpo_masked_positions_give_zero_gradient():
    logp = torch.tensor([-1.0, -50.0], **f64, requires_grad=True)
    old = torch.tensor([-1.0, float("-inf")], **f64)
    ref = torch.tensor([-1.0, 800.0], **f64)  # exp(ref − logp) overflows if it is not masked
    loss, _ = grpo_policy_loss(logp, old, ref, torch.tensor([1.0, 1.0], **f64),
                               torch.tensor([True, False]))
    loss.backward()
    assert loss.item() == -1.0 and logp.grad.tolist() == [-1.0, 0.0]
