"""KL estimators, reward shaping, KL controllers and PPO's clipped losses on hand-worked numbers."""
import math

import pytest
import torch

from meshrl.engine.algorithms.losses import (AdaptiveKLController, FixedKLController, entropy_bonus,
                                             kl_estimate, kl_k1, kl_k2, kl_k3, ppo_policy_loss,
                                             ppo_value_loss, shape_rewards)

LN2 = math.log(2.0)
f64 = dict(dtype=torch.float64)


def test_kl_estimators_worked_numbers():
    logp = torch.log(torch.tensor([0.5, 0.25], **f64))
    ref = torch.log(torch.tensor([0.25, 0.5], **f64))
    assert kl_k1(logp, ref).tolist() == pytest.approx([LN2, -LN2])
    assert kl_k2(logp, ref).tolist() == pytest.approx([0.5 * LN2 ** 2, 0.5 * LN2 ** 2])
    # k3 = π_ref/π − log(π_ref/π) − 1: 0.5 + ln2 − 1 and 2 − ln2 − 1.
    assert kl_k3(logp, ref).tolist() == pytest.approx([LN2 - 0.5, 1.0 - LN2])
    assert kl_estimate(logp, ref, "k3").tolist() == kl_k3(logp, ref).tolist()
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_for_the_exact_kl():
    pi, ref = torch.tensor([0.5, 0.3, 0.2], **f64), torch.tensor([0.2, 0.5, 0.3], **f64)
    exact = (pi * (pi / ref).log()).sum()
    for est in (kl_k1, kl_k3):
        expectation = (pi * est(pi.log(), ref.log())).sum().item()
        assert expectation == pytest.approx(exact.item(), rel=1e-12)
    # k2 is biased (here upward) but never negative.
    assert (pi * kl_k2(pi.log(), ref.log())).sum().item() > exact.item()


def test_k3_keeps_its_digits_near_zero():
    # d = −1e-8: k3 ≈ d²/2 = 5e-17; exp(d) − 1 − d in float64 would be off by ~20%.
    ref = torch.tensor([-1.0], **f64)
    assert kl_k3(ref + 1e-8, ref).item() == pytest.approx(5e-17, rel=1e-3)


CU = torch.tensor([0, 3, 5, 6], dtype=torch.int32)
LOG_RATIO = torch.tensor([0.1, -0.2, 0.3, 0.5, 0.0, 1.0], **f64)
KL_REWARD = [-0.01, 0.02, -0.03, -0.05, 0.0, -0.1]  # −0.1·k1
SCORES = torch.tensor([25.0, -3.0, 7.0], **f64)
ENDED = torch.tensor([True, False, True])


def _shape(**kw):
    kw = {"kl_coef": 0.1, "ended": ENDED, **kw}
    return shape_rewards(SCORES, LOG_RATIO - 2.0, torch.full((6,), -2.0, **f64), CU, **kw).tolist()


def test_shape_rewards_scores_the_last_action_and_clips():
    expect = list(KL_REWARD)
    expect[2] += 20.0  # 25 clipped to 20
    expect[4] += -3.0  # truncated, scored as if final (the default)
    expect[5] += 7.0
    assert _shape() == pytest.approx(expect)
    unclipped = list(expect)
    unclipped[2] += 5.0
    assert _shape(reward_clip=None) == pytest.approx(unclipped)


def test_shape_rewards_truncation_modes_and_penalty():
    bootstrap = list(KL_REWARD)
    bootstrap[2] += 20.0
    bootstrap[5] += 7.0  # the truncated sequence gets no score: the critic bootstraps it
    assert _shape(truncated="bootstrap") == pytest.approx(bootstrap)
    penalised = list(bootstrap)
    penalised[4] -= 1.0
    assert _shape(truncated="bootstrap", truncation_penalty=1.0) == pytest.approx(penalised)
    scored = list(bootstrap)
    scored[4] += -3.0 - 1.0
    assert _shape(truncation_penalty=1.0) == pytest.approx(scored)
    with pytest.raises(ValueError, match="truncated"):
        _shape(truncated="drop")


def test_shape_rewards_k3_no_grad_and_empty_sequence():
    logp = (LOG_RATIO - 2.0).requires_grad_(True)
    ref = torch.full((6,), -2.0, **f64)
    out = shape_rewards(SCORES, logp, ref, CU, kl_coef=0.1, estimator="k3")
    assert not out.requires_grad
    expect = (-0.1 * kl_k3(LOG_RATIO, torch.zeros(6, **f64))).tolist()
    expect[2] += 20.0
    expect[4] += -3.0
    expect[5] += 7.0
    assert out.tolist() == pytest.approx(expect)
    with pytest.raises(ValueError, match="empty"):
        shape_rewards(SCORES, logp, ref, torch.tensor([0, 3, 3, 6], dtype=torch.int32), kl_coef=0.1)


def _policy_case():
    # ratio, advantage: inside the clip; beyond it on both sides with both signs of A.
    ratios = torch.tensor([1.0, 1.5, 1.5, 0.5, 0.5], **f64)
    adv = torch.tensor([2.0, 1.0, -1.0, -1.0, 1.0], **f64)
    old = torch.full((5,), -1.0, **f64)
    return (old + ratios.log()).requires_grad_(True), old, adv


def test_ppo_policy_loss_branches_and_gradients():
    logp, old, adv = _policy_case()
    loss, m = ppo_policy_loss(logp, old, adv, clip_eps=0.2)
    # −min(ρA, clip(ρ)A): −2; −1.2 (clipped); +1.5 (unclipped, pessimistic); +0.8 (clipped); −0.5.
    assert loss.item() == pytest.approx((-2.0 - 1.2 + 1.5 + 0.8 - 0.5) / 5, rel=1e-12)
    loss.backward()
    # d/dlogp of −ρA is −ρA on the unclipped branch; the clipped branch has no gradient.
    assert logp.grad.tolist() == pytest.approx([-2.0 / 5, 0.0, 1.5 / 5, 0.0, -0.5 / 5])
    assert m["clip_frac"].item() == pytest.approx(2 / 5)
    assert m["ratio_out_frac"].item() == pytest.approx(4 / 5)
    k3 = [0.0, 0.5 - math.log(1.5), 0.5 - math.log(1.5), LN2 - 0.5, LN2 - 0.5]
    assert m["approx_kl"].item() == pytest.approx(sum(k3) / 5, rel=1e-12)


def test_ppo_policy_loss_mask_and_global_count():
    logp, old, adv = _policy_case()
    mask = torch.tensor([False, True, True, True, True])
    loss, m = ppo_policy_loss(logp, old, adv, mask, num_tokens=8)
    assert loss.item() == pytest.approx((-1.2 + 1.5 + 0.8 - 0.5) / 8, rel=1e-12)
    assert m["clip_frac"].item() == pytest.approx(2 / 4)


@pytest.mark.parametrize("offset, grad", [(-1e-6, -1.0), (1e-6, 0.0)])
def test_ppo_policy_gradient_switches_off_at_the_clip(offset, grad):
    old = torch.tensor([0.0], **f64)
    logp = torch.tensor([math.log(1.2 + offset)], **f64, requires_grad=True)
    ppo_policy_loss(logp, old, torch.ones(1, **f64), clip_eps=0.2)[0].backward()
    assert logp.grad.item() == pytest.approx(grad * 1.2, abs=1e-5)


def test_ppo_value_loss_branches_and_gradients():
    values = torch.tensor([1.0, 1.5, 1.5, 0.5], **f64, requires_grad=True)
    old = torch.tensor([1.0, 1.0, 1.0, 1.0], **f64)
    returns = torch.tensor([2.0, 2.0, 1.0, 3.0], **f64)
    loss, m = ppo_value_loss(values, old, returns, value_clip=0.2)
    # ½·max((V−R)², (Vclip−R)²): 1 | max(.25, .64) | max(.25, .04) | max(6.25, 4.84).
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.64 + 0.25 + 6.25) / 4, rel=1e-12)
    loss.backward()
    # Token 2 moved 0.5 toward R, past the clip: the clipped error wins and V gets no gradient.
    assert values.grad.tolist() == pytest.approx([-1.0 / 4, 0.0, 0.5 / 4, -2.5 / 4])
    assert m["vf_clip_frac"].item() == pytest.approx(1 / 4)
    loss, _ = ppo_value_loss(values, old, returns, value_clip=None)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.25 + 0.25 + 6.25) / 4, rel=1e-12)


def test_entropy_bonus_sign_and_count():
    ent = torch.tensor([1.0, 2.0, 3.0])
    mask = torch.tensor([True, True, False])
    assert entropy_bonus(ent, mask, coef=0.01).item() == pytest.approx(-0.015)
    assert entropy_bonus(ent, mask, coef=0.01, num_tokens=3).item() == pytest.approx(-0.01)


@pytest.mark.parametrize("kl, mult", [(12.0, 1 + 0.2 * 512 / 10000),   # error clipped to +0.2
                                      (3.0, 1 - 0.2 * 512 / 10000),    # clipped to −0.2
                                      (6.6, 1 + 0.1 * 512 / 10000)])
def test_adaptive_kl_controller(kl, mult):
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(kl, n_steps=512) == pytest.approx(0.1 * mult, rel=1e-12)
    clone = AdaptiveKLController(1.0, target=1.0, horizon=1)
    clone.load_state_dict(ctl.state_dict())
    assert clone.update(kl, 512) == pytest.approx(ctl.update(kl, 512))


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 512) == 0.05 and ctl.value == 0.05


def test_masked_garbage_cannot_poison_the_gradient():
    # A prompt position holding −inf old log-prob and a NaN advantage: masked out, it must give a
    # zero gradient, not 0·inf = NaN through torch.where's backward.
    logp = torch.tensor([-1.0, -2.0], **f64, requires_grad=True)
    old = torch.tensor([-1.0, float("-inf")], **f64)
    adv = torch.tensor([1.0, float("nan")], **f64)
    mask = torch.tensor([True, False])
    loss, m = ppo_policy_loss(logp, old, adv, mask)
    loss.backward()
    assert loss.item() == -1.0 and m["clip_frac"].item() == 0.0
    assert logp.grad.tolist() == [-1.0, 0.0]
    values = torch.tensor([0.5, float("inf")], **f64, requires_grad=True)
    vloss, _ = ppo_value_loss(values, torch.tensor([0.4, 0.0], **f64),
                              torch.tensor([1.0, 0.0], **f64), mask)
    vloss.backward()
    assert vloss.item() == 0.125 and values.grad.tolist() == [-0.5, 0.0]
