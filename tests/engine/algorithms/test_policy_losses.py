"""The policy objectives (clip with asymmetric ε, dual-clip, GSPO), their metrics and the four loss
aggregations on crafted tokens whose expected losses and gradients are worked by hand."""
import math

import pytest
import torch

from meshrl.engine.algorithms.policy_losses import (AGGREGATIONS, LossCounts, aggregate,
                                                    policy_terms)
from meshrl.engine.batch import pack
from meshrl.engine.train import global_seq_count, global_token_count
from meshrl.parallel.layout import ParallelLayout

f64 = dict(dtype=torch.float64)
LN = math.log


def _tokens(ratios, advs):
    """A masked prompt position (garbage log-probs: −inf now, 0 before) and then one action per
    ratio; returns logp (a leaf), old_logp, advantages, mask."""
    old = torch.tensor([0.0] + [-1.0] * len(ratios), **f64)
    logp = torch.tensor([-math.inf] + [-1.0 + LN(r) for r in ratios], **f64).requires_grad_(True)
    adv = torch.tensor([123.0] + list(advs), **f64)
    mask = torch.tensor([False] + [True] * len(ratios))
    return logp, old, adv, mask


def _token_mean(per_token, mask):
    n = int(mask.sum())
    return aggregate(per_token, mask, torch.tensor([0, mask.numel()], dtype=torch.int32),
                     "token-mean", LossCounts(tokens=n, seqs=1))


# clip, ε_low = 0.2: four actions (ratio ρ, advantage A) and −min(ρA, clip(ρ)·A):
#   t0 ρ 1.25, A +1: inside [0.8, 1.28] -> −1.25, d/dlogp = −ρA = −1.25
#                    at ε_high 0.2: clip(ρ) = 1.2 < ρ -> −1.2, no gradient (clipped)
#   t1 ρ 0.75, A +1: ρA = 0.75 < 0.8·1 -> −0.75 with gradient −0.75 (ratio out of range, not clipped)
#   t2 ρ 0.75, A −1: min(−0.75, −0.8) = −0.8 -> +0.8, no gradient (clipped)
#   t3 ρ 1,    A −2: +2, d/dlogp = −ρA = +2
RATIOS, ADVS = [1.25, 0.75, 0.75, 1.0], [1.0, 1.0, -1.0, -2.0]
# approx_kl (k3 of KL(π_old‖π)) = mean of (ρ − 1) − ln ρ:
#   t0 0.25 − 0.2231436 = 0.0268564; t1, t2 −0.25 + 0.2876821 = 0.0376821; t3 0
#   -> (0.0268564 + 2·0.0376821)/4 = 0.0255551
APPROX_KL = 0.0255551


def test_clip_higher_keeps_a_ratio_of_1_25_that_symmetric_clip_removes():
    logp, old, adv, mask = _tokens(RATIOS, ADVS)
    per_token, m = policy_terms(logp, old, adv, mask, kind="clip", clip_eps_low=0.2,
                                clip_eps_high=0.28)
    assert per_token[1:].tolist() == pytest.approx([-1.25, -0.75, 0.8, 2.0], abs=1e-12)
    assert per_token[0].item() == 0.0  # masked position: ρ = 1, A = 0
    loss = _token_mean(per_token, mask)
    assert loss.item() == pytest.approx((-1.25 - 0.75 + 0.8 + 2.0) / 4, abs=1e-12)  # 0.2
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([0.0, -1.25 / 4, -0.75 / 4, 0.0, 2.0 / 4], abs=1e-12)
    # clip_frac: only t2's gradient was removed; ratio_out_frac: t1 and t2 are below 0.8
    assert m["clip_frac"].item() == pytest.approx(1 / 4)
    assert m["ratio_out_frac"].item() == pytest.approx(2 / 4)
    assert m["approx_kl"].item() == pytest.approx(APPROX_KL, abs=1e-7)
    assert m["ratio_mean"].item() == pytest.approx((1.25 + 0.75 + 0.75 + 1.0) / 4)

    logp, old, adv, mask = _tokens(RATIOS, ADVS)
    per_token, m = policy_terms(logp, old, adv, mask, kind="clip", clip_eps_low=0.2,
                                clip_eps_high=0.2)
    assert per_token[1:].tolist() == pytest.approx([-1.2, -0.75, 0.8, 2.0], abs=1e-12)
    loss = _token_mean(per_token, mask)
    assert loss.item() == pytest.approx((-1.2 - 0.75 + 0.8 + 2.0) / 4, abs=1e-12)  # 0.2125
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, -0.75 / 4, 0.0, 2.0 / 4], abs=1e-12)
    assert m["clip_frac"].item() == pytest.approx(2 / 4)  # t0 and t2
    assert m["ratio_out_frac"].item() == pytest.approx(3 / 4)  # t0, t1, t2


# dual-clip, c = 3, ε = 0.2:
#   t0 ρ 4, A −1: clip gives −min(−4, −1.2) = 4; the cap −c·A = 3 wins -> 3, no gradient
#                 (clip_frac_lower; not clip_frac: the ordinary clip kept the unclipped branch)
#   t1 ρ 2, A −1: 2 < 3, not capped; gradient −ρA = 2
#   t2 ρ 4, A +1: clipped to 1.2 -> −1.2, no gradient (clip_frac); the cap is for A < 0 only
#   t3 ρ 1, A −0.5: 0.5 < 1.5; gradient −ρA = 0.5
DUAL_RATIOS, DUAL_ADVS = [4.0, 2.0, 4.0, 1.0], [-1.0, -1.0, 1.0, -0.5]


def test_dual_clip_caps_a_negative_advantage_at_c_times_its_size():
    logp, old, adv, mask = _tokens(DUAL_RATIOS, DUAL_ADVS)
    per_token, m = policy_terms(logp, old, adv, mask, kind="dual_clip", clip_ratio_c=3.0)
    assert per_token[1:].tolist() == pytest.approx([3.0, 2.0, -1.2, 0.5], abs=1e-12)
    loss = _token_mean(per_token, mask)
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.2 + 0.5) / 4, abs=1e-12)  # 1.075
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, 2.0 / 4, 0.0, 0.5 / 4], abs=1e-12)
    assert m["clip_frac_lower"].item() == pytest.approx(1 / 4)  # t0
    assert m["clip_frac"].item() == pytest.approx(1 / 4)  # t2
    assert m["ratio_out_frac"].item() == pytest.approx(3 / 4)  # t0, t1, t2 above 1.2
    # plain clip on the same tokens: t0 is unbounded (4, gradient 4); no clip_frac_lower metric
    logp, old, adv, mask = _tokens(DUAL_RATIOS, DUAL_ADVS)
    per_token, m = policy_terms(logp, old, adv, mask, kind="clip")
    assert per_token[1].item() == pytest.approx(4.0)
    _token_mean(per_token, mask).backward()
    assert logp.grad[1].item() == pytest.approx(4.0 / 4)
    assert "clip_frac_lower" not in m
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_terms(*_tokens(DUAL_RATIOS, DUAL_ADVS), kind="dual_clip", clip_ratio_c=1.0)


# GSPO: a prompt position, then three responses (per-token log-ratios; advantage):
#   b0 [0.2, 0.0]        A +1: s = exp(0.1)  = 1.1051709 (in [0.8, 1.2])   -> −1.1051709 per token
#   b1 [−0.1, −0.3, −0.2] A +2: s = exp(−0.2) = 0.8187308 (in range)        -> −1.6374615 per token
#   b2 [0.5]             A +1: s = exp(0.5)  = 1.6487213 > 1.2, A > 0: clipped -> −1.2, no gradient
# token-mean over 6 actions: (2·−1.1051709 + 3·−1.6374615 − 1.2)/6 = −8.3227263/6 = −1.3871211
# gradient w.r.t. logp_t: −s_b·A_b/6 -> b0 −0.1841952, b1 −0.2729102, b2 0
GSPO_LR = [[0.2, 0.0], [-0.1, -0.3, -0.2], [0.5]]
GSPO_ADV = [1.0, 2.0, 1.0]


def _gspo_batch():
    lr = [x for seq in GSPO_LR for x in seq]
    old = torch.tensor([0.0] + [-1.5] * len(lr), **f64)
    logp = torch.tensor([math.nan] + [-1.5 + x for x in lr], **f64).requires_grad_(True)
    adv = torch.tensor([0.0] + [a for a, seq in zip(GSPO_ADV, GSPO_LR) for _ in seq], **f64)
    mask = torch.tensor([False] + [True] * len(lr))
    # the prompt position rides with b0, as in a packed batch
    cu = torch.tensor([0, 3, 6, 7], dtype=torch.int32)
    return logp, old, adv, mask, cu


def test_gspo_sequence_ratio_value_and_gradient():
    logp, old, adv, mask, cu = _gspo_batch()
    per_token, m = policy_terms(logp, old, adv, mask, cu, kind="gspo")
    s0, s1 = math.exp(0.1), math.exp(-0.2)
    assert per_token.tolist() == pytest.approx([0.0, -s0, -s0, -2 * s1, -2 * s1, -2 * s1, -1.2],
                                               abs=1e-12)
    loss = aggregate(per_token, mask, cu, "token-mean", LossCounts(tokens=6, seqs=3))
    assert loss.item() == pytest.approx(-1.3871211, abs=1e-7)
    loss.backward()
    # the docstring's gradient: s·A·∇log π_t, here over the 6 counted actions
    assert logp.grad.tolist() == pytest.approx([0.0, -0.1841952, -0.1841952, -0.2729102, -0.2729102,
                                                -0.2729102, 0.0], abs=1e-7)
    assert logp.grad[1].item() == pytest.approx(-s0 * 1.0 / 6, abs=1e-12)
    assert logp.grad[3].item() == pytest.approx(-s1 * 2.0 / 6, abs=1e-12)
    # metrics: seq_ratio_mean over actions (2.2103418 + 2.4561924 + 1.6487213)/6 = 6.3152555/6 = 1.0525426;
    # only b2's one action is clipped and out of range
    assert m["seq_ratio_mean"].item() == pytest.approx(1.0525426, abs=1e-7)
    assert m["clip_frac"].item() == pytest.approx(1 / 6)
    assert m["ratio_out_frac"].item() == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="cu_seqlens"):
        policy_terms(logp, old, adv, mask, kind="gspo")


def test_gspo_token_form_with_sequence_means_is_the_papers_gradient():
    """Per response, −min(s·A, clip(s)·A) with s = exp(mean log ρ) differentiated through s (the
    paper's objective, seq-mean-token-mean) gives the same gradient as the token form."""
    logp, old, adv, mask, cu = _gspo_batch()
    per_token, _ = policy_terms(logp, old, adv, mask, cu, kind="gspo")
    aggregate(per_token, mask, cu, "seq-mean-token-mean", LossCounts(tokens=6, seqs=3)).backward()
    got = logp.grad.clone()
    lp = logp.detach().clone().requires_grad_(True)
    total = 0.0
    for b, (lo, hi) in enumerate([(1, 3), (3, 6), (6, 7)]):
        s = torch.exp((lp[lo:hi] - old[lo:hi]).mean())
        a = GSPO_ADV[b]
        total = total - torch.minimum(s * a, s.clamp(0.8, 1.2) * a)
    (total / 3).backward()
    # b0: ∂/∂logp_t = −s0·A/(2·3) = −0.1841952; b1: −s1·2/(3·3) = −0.1819402; b2: 0
    torch.testing.assert_close(got, lp.grad, atol=1e-12, rtol=0)
    assert got[1].item() == pytest.approx(-0.1841952, abs=1e-7)
    assert got[3].item() == pytest.approx(-0.1819402, abs=1e-7)


def test_unknown_policy_loss_is_refused():
    with pytest.raises(ValueError, match="policy loss"):
        policy_terms(*_tokens(RATIOS, ADVS), kind="ppo2")


# Aggregation: three packed sequences (prompt positions masked), per-token losses L_t:
#   seq0 positions [9, 1, 2, 3], mask [0, 1, 1, 1]: Σ 6 over 3 actions, mean 2
#   seq1 positions [9, 9, 4],    mask [0, 0, 1]:    Σ 4 over 1 action,  mean 4
#   seq2 positions [inf, nan],   mask [0, 0]:       no counted action:  Σ 0, mean 0 (not NaN)
# with the step's global counts tokens 8, seqs 4 (other shards hold the rest), norm_len 5:
#   token-mean               10/8     = 1.25   ∂/∂L_t = 1/8 on counted tokens
#   seq-mean-token-sum       10/4     = 2.5    ∂ = 1/4
#   seq-mean-token-mean      (2+4+0)/4 = 1.5   ∂ = 1/(3·4) = 1/12 in seq0, 1/(1·4) = 1/4 in seq1
#   seq-mean-token-sum-norm  10/(4·5) = 0.5    ∂ = 1/20
AGG_VALUES = [9.0, 1.0, 2.0, 3.0, 9.0, 9.0, 4.0, math.inf, math.nan]
AGG_MASK = [0, 1, 1, 1, 0, 0, 1, 0, 0]
AGG_CU = torch.tensor([0, 4, 7, 9], dtype=torch.int32)
AGG_EXPECT = {"token-mean": (1.25, [1 / 8] * 3, 1 / 8),
              "seq-mean-token-sum": (2.5, [1 / 4] * 3, 1 / 4),
              "seq-mean-token-mean": (1.5, [1 / 12] * 3, 1 / 4),
              "seq-mean-token-sum-norm": (0.5, [1 / 20] * 3, 1 / 20)}


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregate_hand_worked(mode):
    x = torch.tensor(AGG_VALUES, **f64).requires_grad_(True)
    mask = torch.tensor(AGG_MASK, dtype=torch.bool)
    loss = aggregate(x, mask, AGG_CU, mode, LossCounts(tokens=8, seqs=4, norm_len=5))
    value, seq0_grad, seq1_grad = AGG_EXPECT[mode]
    assert loss.item() == pytest.approx(value, abs=1e-12)
    loss.backward()
    want = [0.0] + seq0_grad + [0.0, 0.0, seq1_grad, 0.0, 0.0]
    assert x.grad.tolist() == pytest.approx(want, abs=1e-12)  # finite everywhere, masked 0


def test_aggregate_with_local_counts_and_bad_mode():
    # this shard alone (tokens 4, seqs 2): token-mean 10/4 = 2.5 but seq-mean-token-mean
    # (2 + 4)/2 = 3: the long response no longer outweighs the short one
    x = torch.tensor(AGG_VALUES, **f64)
    mask = torch.tensor(AGG_MASK, dtype=torch.bool)
    c = LossCounts(tokens=4, seqs=2)
    assert aggregate(x, mask, AGG_CU, "token-mean", c).item() == pytest.approx(2.5)
    assert aggregate(x, mask, AGG_CU, "seq-mean-token-mean", c).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(x, mask, AGG_CU, "sum", c)


def test_global_counts_skip_a_response_with_no_counted_action():
    # three prompt+response sequences, actions 3, 1 and 2; the third is not counted (overlong
    # filter): 4 counted actions in 2 responses on one rank (dp_group None: the sum is local)
    mb = pack([[5, 6, 7, 8, 9], [5, 6, 7], [5, 6, 7, 8]], loss_from=[1, 1, 1])
    counted = torch.tensor([1.0] * 5 + [1.0] * 3 + [0.0] * 4)
    mb.tokens["action_mask"] = mb.tokens["loss_mask"] * counted
    layout = ParallelLayout(ranks=[0])
    assert mb.tokens["loss_mask"].sum().item() == 3 + 1 + 2
    assert global_token_count([mb], layout, "action_mask") == 4.0
    assert global_seq_count([mb], layout, "action_mask") == 2.0
    assert global_seq_count([mb, mb], layout, "loss_mask") == 6.0
