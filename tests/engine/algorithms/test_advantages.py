"""The critic-free estimators (``baseline_adjusted`` then ``token_advantages``) and DAPO's soft
overlong punishment on small batches whose expected values are worked by hand in the comments."""

import pytest
import torch

from meshrl.engine.algorithms.advantages import (ESTIMATORS, baseline_adjusted, token_advantages)
from meshrl.engine.runtime.policy_gradient import overlong_penalty

# two prompts, k = 3 samples each: group 0 {1, 2, 6} (mean 3, deviations −2, −1, +3),
# group 1 {3, 3, 3} (all equal: no signal)
SCORES = torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0, 3.0])
K = 3


def _cu(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu


def test_grpo_divides_by_the_sample_std_plus_eps():
    # group 0: Σ dev² = 4 + 1 + 9 = 14, sample variance 14/(3 − 1) = 7, std √7 = 2.6457513;
    # with eps = 0.5 (large, to see where it goes): dev/(√7 + 0.5) = dev/3.1457513
    #   −2/3.1457513 = −0.6357782, −1/3.1457513 = −0.3178891, 3/3.1457513 = 0.9536672.
    # (The population std √(14/3) = 2.1602469 would give −2/2.6602469 = −0.7518.)
    # group 1: numerator 0, std 0 -> 0/(0 + eps) = 0, not NaN.
    out = baseline_adjusted(SCORES, "grpo", K, eps=0.5)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([-0.6357782, -0.3178891, 0.9536672, 0, 0, 0], abs=1e-6)
    # default eps 1e-6: dev/√7 = −0.7559289, −0.3779645, 1.1338934
    assert baseline_adjusted(SCORES, "grpo", K).tolist() == pytest.approx(
        [-0.7559289, -0.3779645, 1.1338934, 0, 0, 0], abs=1e-6)


def test_dr_grpo_and_reinforce_pp_baseline_center_without_dividing():
    # r − group mean: {1, 2, 6} − 3 and {3, 3, 3} − 3
    for est in ("dr_grpo", "reinforce_pp_baseline"):
        assert baseline_adjusted(SCORES, est, K).tolist() == [-2.0, -1.0, 3.0, 0.0, 0.0, 0.0]


def test_rloo_uses_the_mean_of_the_other_samples():
    # 1 − (2 + 6)/2 = −3; 2 − (1 + 6)/2 = −1.5; 6 − (1 + 2)/2 = 4.5  (= 3/2 · (r − 3))
    assert baseline_adjusted(SCORES, "rloo", K).tolist() == [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]


def test_reinforce_pp_has_no_baseline_and_remax_subtracts_the_greedy_score():
    assert baseline_adjusted(SCORES, "reinforce_pp", K).tolist() == SCORES.tolist()
    # greedy responses scored 2 (prompt 0) and 5 (prompt 1):
    # {1, 2, 6} − 2 = {−1, 0, 4}; {3, 3, 3} − 5 = {−2, −2, −2}
    greedy = torch.tensor([2.0, 5.0])
    assert baseline_adjusted(SCORES, "remax", K, greedy_scores=greedy).tolist() == \
        [-1.0, 0.0, 4.0, -2.0, -2.0, -2.0]
    with pytest.raises(ValueError, match="greedy"):
        baseline_adjusted(SCORES, "remax", K)


def test_bad_estimator_and_group_sizes_are_refused():
    assert set(ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline",
                               "remax"}
    with pytest.raises(ValueError, match="estimator"):
        baseline_adjusted(SCORES, "ppo", K)
    with pytest.raises(ValueError, match="group_size"):
        baseline_adjusted(SCORES, "grpo", 4)  # 6 scores are not groups of 4
    with pytest.raises(ValueError):
        baseline_adjusted(SCORES[:1], "rloo", 1)  # no "others" to take a baseline from


def test_outcome_estimators_spread_the_value_over_every_action():
    # γ = 1, no per-token reward: every action of response b gets its adjusted score
    cu = _cu([2, 1, 3, 1, 2, 1])
    seq = baseline_adjusted(SCORES, "rloo", K)  # [−3, −1.5, 4.5, 0, 0, 0]
    adv = token_advantages(seq, cu)
    assert adv.tolist() == [-3.0, -3.0, -1.5, 4.5, 4.5, 4.5, 0.0, 0.0, 0.0, 0.0]
    seq = baseline_adjusted(SCORES, "remax", K, greedy_scores=torch.tensor([2.0, 5.0]))
    assert token_advantages(seq, cu).tolist() == [-1.0, -1.0, 0.0, 4.0, 4.0, 4.0, -2.0, -2.0, -2.0,
                                                  -2.0]


# REINFORCE++: two responses of 3 and 2 actions, scores +1 and −1, per-token KL rewards −β·KL_t,
# γ = 0.5.
RPP_CU = _cu([3, 2])
RPP_KL_REWARD = torch.tensor([-0.1, -0.2, 0.0, -0.1, -0.3])
# rewards with the score at each last action: [−0.1, −0.2, 1.0 | −0.1, −1.3]
# discounted returns, back to front:
#   response 0: A2 = 1.0; A1 = −0.2 + 0.5·1.0 = 0.3; A0 = −0.1 + 0.5·0.3 = 0.05
#   response 1: A4 = −1.3; A3 = −0.1 + 0.5·(−1.3) = −0.75
RPP_RAW = [0.05, 0.3, 1.0, -0.75, -1.3]
# whitening over all 5 actions, biased variance:
#   mean = (0.05 + 0.3 + 1.0 − 0.75 − 1.3)/5 = −0.7/5 = −0.14
#   deviations 0.19, 0.44, 1.14, −0.61, −1.16; squares 0.0361, 0.1936, 1.2996, 0.3721, 1.3456
#   variance = 3.247/5 = 0.6494, std = 0.8058536 (the 1e-8 under the root is below the tolerance)
#   whitened = deviation/0.8058536
RPP_WHITE = [0.2357748, 0.5460049, 1.4146490, -0.7569613, -1.4394674]


def test_reinforce_pp_discounts_the_kl_rewards_then_whitens():
    seq = baseline_adjusted(torch.tensor([1.0, -1.0]), "reinforce_pp", 1)
    raw = token_advantages(seq, RPP_CU, token_rewards=RPP_KL_REWARD, gamma=0.5)
    assert raw.tolist() == pytest.approx(RPP_RAW, abs=1e-6)
    white = token_advantages(seq, RPP_CU, token_rewards=RPP_KL_REWARD, gamma=0.5, whiten=True)
    assert white.tolist() == pytest.approx(RPP_WHITE, abs=1e-6)
    assert white.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert white.pow(2).mean().item() == pytest.approx(1.0, abs=1e-6)
    # the token rewards are an input, not modified in place
    assert RPP_KL_REWARD.tolist() == pytest.approx([-0.1, -0.2, 0.0, -0.1, -0.3])


def test_whitening_statistics_come_from_the_masked_actions_only():
    # mask = response 0 only: mean (0.05 + 0.3 + 1.0)/3 = 0.45; deviations −0.4, −0.15, 0.55;
    # variance (0.16 + 0.0225 + 0.3025)/3 = 0.1616667, std 0.4020779. Every element is transformed
    # (callers drop what they do not count): response 1 becomes (−0.75 − 0.45)/0.4020779 = −2.9844960
    # and (−1.3 − 0.45)/0.4020779 = −4.3523900;
    # response 0: −0.4/0.4020779 = −0.9948320, −0.15/… = −0.3730620, 0.55/… = 1.3678940.
    seq = torch.tensor([1.0, -1.0])
    mask = torch.tensor([True, True, True, False, False])
    out = token_advantages(seq, RPP_CU, token_rewards=RPP_KL_REWARD, gamma=0.5, whiten=True,
                           mask=mask)
    assert out.tolist() == pytest.approx([-0.9948320, -0.3730620, 1.3678940, -2.9844960, -4.3523900],
                                         abs=1e-6)


def test_reinforce_pp_baseline_centers_per_group_then_whitens_globally():
    # scores {1, 3} and {0, 0} (k = 2): centered −1, +1, 0, 0; responses of 2, 2, 1, 1 actions,
    # γ = 1 -> actions [−1, −1, 1, 1, 0, 0]: mean 0, biased variance 4/6 = 2/3,
    # whitened ±1/√(2/3) = ±1.2247449 and 0.
    seq = baseline_adjusted(torch.tensor([1.0, 3.0, 0.0, 0.0]), "reinforce_pp_baseline", 2)
    out = token_advantages(seq, _cu([2, 2, 1, 1]), whiten=True)
    w = 1.2247449
    assert out.tolist() == pytest.approx([-w, -w, w, w, 0.0, 0.0], abs=1e-6)


def test_overlong_penalty_is_zero_then_linear_to_minus_penalty_at_the_limit():
    # max_new_tokens 20, buffer 4: free up to 16 tokens, then −penalty·(len − 16)/4
    lengths = torch.tensor([1, 10, 16, 17, 18, 19, 20])
    out = overlong_penalty(lengths, max_new_tokens=20, buffer=4, penalty=1.0)
    assert out.dtype == torch.float32
    assert out.tolist() == [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0]
    # penalty 0.5 scales the ramp; the end point is −0.5
    assert overlong_penalty(lengths, 20, 4, 0.5).tolist() == [0.0, 0.0, 0.0, -0.125, -0.25, -0.375,
                                                              -0.5]
    assert overlong_penalty(lengths, 20, 0, 1.0).tolist() == [0.0] * 7  # no buffer: no penalty
