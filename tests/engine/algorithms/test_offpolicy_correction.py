"""The off-policy corrections of the actor's loss (``async.correction``): the behaviour weight
π_prox/π_behav, AReaL's decoupled objective (tokens above the cap left out) and verl's truncated IS
(the weight clamped at the cap), on crafted tokens worked by hand, against the peers' own functions
(AReaL's ``ppo_actor_loss_fn``, verl's ``compute_rollout_correction_weights`` with
``compute_policy_loss_vanilla``/``_gspo``), and ``none`` bit for bit the on-policy loss.

Hand-worked tokens (one response after a prompt position, then a position that is not counted;
ε = 0.2, so ρ is clipped to [0.8, 1.2]):

    action  log π_prox  log π_behav  w = e^(prox − behav)  log π  ρ = e^(logp − prox)  A     L_t
    1       −1.0        −1.0         e^0 = 1               −0.9   e^0.1  in range     1.0   −e^0.1
    2       −0.5        −1.2         e^0.7 ≈ 2.01          −0.2   e^0.3 > 1.2         0.5   −0.6
    3       −0.2        −2.0         e^1.8 ≈ 6.05          −0.3   e^−0.1 in range     −1.0  e^−0.1
    4       −2.0        −1.5         e^−0.5 ≈ 0.61         −2.5   e^−0.5 < 0.8        −2.0  1.6
    5       −1.0        −inf         non-finite: e^0 = 1   −1.0   1                   0.3   −0.3

dL_t/dlog π: −e^0.1, 0 (clipped), e^−0.1, 0 (clipped), −0.3.
"""
import math
import types

import pytest
import torch

from meshrl.engine.algorithms.calls import policy_call
from meshrl.engine.algorithms.policy_losses import (IMP_CAP, LossCounts, aggregate, behaviour_cap,
                                                    behaviour_ratio, behaviour_stats, behaviour_weights,
                                                    policy_terms)
from meshrl.engine.algorithms.ppo_losses import kl_estimate
from meshrl.engine.algorithms.reductions import zero_masked
from tests.engine.algorithms import peers
from tests.engine.algorithms.peers import unpad
from tests.engine.algorithms.test_peer_oracles_losses import (MODES, SPLITS, TOL, TOL_EPS, _batch,
                                                              _counts, _grad, _padded, _select)

f64 = dict(dtype=torch.float64)
E = math.exp
L_HAND = [-E(0.1), -0.6, E(-0.1), 1.6, -0.3]  # the per-action clip losses of the table
DL_HAND = [-E(0.1), 0.0, E(-0.1), 0.0, -0.3]
RAW_HAND = [1.0, E(0.7), E(1.8), E(-0.5), 1.0]
# (correction, cap) -> per-action weights and which were capped
HAND = {("decoupled", None): ([1.0, E(0.7), 0.0, E(-0.5), 1.0], [0, 0, 1, 0, 0]),  # cap 5
        ("decoupled", 2.0): ([1.0, 0.0, 0.0, E(-0.5), 1.0], [0, 1, 1, 0, 0]),
        ("tis", None): ([1.0, 2.0, 2.0, E(-0.5), 1.0], [0, 1, 1, 0, 0]),  # cap 2
        ("tis", 5.0): ([1.0, E(0.7), 5.0, E(-0.5), 1.0], [0, 0, 1, 0, 0])}


def _hand_tokens():
    """Position 0 is a prompt position and 6 an action that is not counted: their log-probs are
    garbage (a log-ratio of 80 or 29 there must reach neither the loss nor the metrics)."""
    old = torch.tensor([40.0, -1.0, -0.5, -0.2, -2.0, -1.0, -1.0], **f64)
    behav = torch.tensor([-40.0, -1.0, -1.2, -2.0, -1.5, -math.inf, -30.0], **f64)
    logp = torch.tensor([-40.0, -0.9, -0.2, -0.3, -2.5, -1.0, -1.0], **f64).requires_grad_()
    adv = torch.tensor([5.0, 1.0, 0.5, -1.0, -2.0, 0.3, 1.0], **f64)
    mask = torch.tensor([False, True, True, True, True, True, False])
    return dict(old=old, behav=behav, logp=logp, adv=adv, mask=mask,
                cu=torch.tensor([0, 7], dtype=torch.int32))


def _actions(x):
    return torch.tensor([0.0, *x, 0.0], **f64)


class _Stage:
    """The last stage as the actor's call reads it: the 'hidden' states are the log-probs."""

    def __init__(self, entropy=None):
        self.entropy = entropy

    def token_logprobs(self, hidden, labels, *, temperature, return_entropy=False):
        return (hidden, self.entropy) if return_entropy else hidden


def _mb(t, **more):
    tokens = dict(labels=torch.zeros_like(t["mask"], dtype=torch.long), action_mask=t["mask"].long(),
                  old_logp=t["old"], advantages=t["adv"], behav_logp=t["behav"], **more)
    return types.SimpleNamespace(tokens=tokens, meta=types.SimpleNamespace(cu_seqlens=t["cu"]))


def _offpolicy_batch(seed):
    """``test_peer_oracles_losses``'s batch with behaviour log-probs: log w uniform in [−1, 2.2),
    so weights below 1, between the caps (2 and 5) and above both; the prompt positions' log w is 80."""
    b = _batch(seed)
    g = torch.Generator().manual_seed(seed + 100)
    log_w = -1.0 + 3.2 * torch.rand(b["old"].numel(), generator=g, **f64)
    b["behav"] = torch.where(b["resp"], b["old"] - log_w, torch.tensor(-40.0, **f64))
    w = log_w[b["mask"]].exp()
    assert (w < 1).any() and ((w > 2) & (w < 5)).any() and (w > 5).any()
    return b


def _masked_frac(x, mask):
    return int((x & mask).sum()) / int(mask.sum())


@pytest.mark.parametrize("correction, cap", list(HAND))
def test_weights_and_loss_match_hand_worked_tokens(correction, cap):
    t = _hand_tokens()
    want_w, want_capped = HAND[(correction, cap)]
    w, capped = behaviour_weights(t["old"], t["behav"], t["mask"], correction, cap)
    torch.testing.assert_close(w, _actions(want_w), rtol=1e-15, atol=0)
    assert capped.tolist() == [False, *map(bool, want_capped), False]
    torch.testing.assert_close(behaviour_ratio(t["old"], t["behav"], t["mask"]), _actions(RAW_HAND),
                               rtol=1e-15, atol=0)

    per_token, _ = policy_terms(t["logp"], t["old"], t["adv"], t["mask"], t["cu"])
    torch.testing.assert_close(per_token, _actions(L_HAND), rtol=1e-15, atol=1e-16)
    loss = aggregate(per_token * w, t["mask"], t["cu"], "token-mean", LossCounts(tokens=5.0, seqs=1.0))
    # the normaliser is the 5 counted actions, a left-out one included (AReaL's loss_mask_count)
    assert loss.item() == pytest.approx(sum(a * b for a, b in zip(want_w, L_HAND)) / 5, rel=1e-14)
    torch.testing.assert_close(torch.autograd.grad(loss, t["logp"])[0],
                               _actions([a * b / 5 for a, b in zip(want_w, DL_HAND)]), rtol=1e-14, atol=0)


@pytest.mark.parametrize("correction, cap", list(HAND))
def test_actor_call_weighs_the_policy_term_only(correction, cap):
    """The whole call on the hand-worked tokens, with k3 KL in the loss (β = 0.1, log π_ref = log π
    − 0.2 on the counted actions: k3 = e^−0.2 + 0.2 − 1 each) and an entropy bonus (c = 0.01, H = 1.5):
    neither is weighted, and the metrics are the raw weight's mean and the capped fraction."""
    t = _hand_tokens()
    want_w, want_capped = HAND[(correction, cap)]
    beta, coef, h = 0.1, 0.01, 1.5
    k3 = E(-0.2) + 0.2 - 1
    fn = policy_call(LossCounts(tokens=5.0, seqs=1.0), temperature=1.0, kl_coef=beta, entropy_coef=coef,
                     correction=correction, imp_cap=cap)
    loss, m = fn(_Stage(torch.full((7,), h, **f64)), t["logp"],
                 _mb(t, ref_logp=t["logp"].detach() - 0.2))
    want = sum(w * L + beta * k3 - coef * h for w, L in zip(want_w, L_HAND)) / 5
    assert loss.item() == pytest.approx(want, rel=1e-14)
    # d k3/d log π = 1 − e^(ref − logp) = 1 − e^−0.2 per counted action
    want_grad = [(w * d + beta * (1 - E(-0.2))) / 5 for w, d in zip(want_w, DL_HAND)]
    torch.testing.assert_close(torch.autograd.grad(loss, t["logp"])[0], _actions(want_grad),
                               rtol=1e-13, atol=1e-17)
    assert m["imp_weight_mean"].item() == pytest.approx(sum(RAW_HAND) / 5, rel=1e-7)  # fp32 metrics
    assert m["imp_capped_frac"].item() == pytest.approx(sum(want_capped) / 5, rel=1e-7)


def test_behaviour_stats_over_the_batch():
    t = _hand_tokens()
    for correction, cap in HAND:
        s = behaviour_stats(t["old"], t["behav"], t["mask"], correction, cap)
        assert s["imp_weight_mean"] == pytest.approx(sum(RAW_HAND) / 5, rel=1e-15)
        assert s["imp_weight_max"] == pytest.approx(E(1.8), rel=1e-15)  # not the garbage positions'
        assert s["imp_capped_frac"] == sum(HAND[(correction, cap)][1]) / 5
    assert behaviour_stats(t["old"], t["behav"], t["mask"], "none")["imp_capped_frac"] == 0.0
    none = behaviour_stats(t["old"], t["behav"], torch.zeros(7, dtype=torch.bool), "tis")
    assert none == {"imp_weight_mean": 0.0, "imp_weight_max": 0.0, "imp_capped_frac": 0.0}


def test_shares_sum_to_the_batch_stats():
    """The call's metrics are shares: summed over the microbatches they give the batch's mean."""
    b = _offpolicy_batch(10)
    counts = _counts(b)
    fn = policy_call(counts, temperature=1.0, correction="tis")
    total = {"imp_weight_mean": 0.0, "imp_capped_frac": 0.0}
    for part in SPLITS[1:]:
        _, tok, cu = _select(b, part)
        t = dict(old=b["old"][tok], behav=b["behav"][tok], adv=b["adv"][tok], mask=b["mask"][tok], cu=cu)
        _, m = fn(_Stage(), b["logp"][tok], _mb(t))
        for k in total:
            total[k] += m[k].item()
    stats = behaviour_stats(b["old"], b["behav"], b["mask"], "tis")
    for k, v in total.items():
        assert v == pytest.approx(stats[k], rel=1e-6)


def test_none_is_the_on_policy_loss_bit_for_bit():
    """``none`` is the call as it was (policy_terms, KL, entropy, aggregate): torch.equal, and it
    needs no behaviour log-probs; a correction whose behaviour is the proximal policy (w = 1) too."""
    b = _offpolicy_batch(11)
    counts = _counts(b)
    cu, mask = b["cu"], b["mask"]
    ent = torch.rand(mask.numel(), generator=torch.Generator().manual_seed(3), **f64)
    per_token, _ = policy_terms(b["logp"], b["old"], b["adv"], mask, cu, kind="dual_clip")
    kl = kl_estimate(zero_masked(b["logp"], mask), zero_masked(b["ref"], mask), "k3")
    per_token = per_token + 0.05 * kl
    per_token = per_token - 0.01 * ent
    want = aggregate(per_token, mask, cu, "seq-mean-token-mean", counts)
    want_grad = _grad(want, b)
    t = dict(old=b["old"], behav=b["behav"], adv=b["adv"], mask=mask, cu=cu)
    for correction, behav in [("none", None), ("tis", b["old"]), ("decoupled", b["old"])]:
        fn = policy_call(counts, kind="dual_clip", agg="seq-mean-token-mean", temperature=1.0,
                         kl_coef=0.05, entropy_coef=0.01, correction=correction)
        mb = _mb(dict(t, behav=behav), ref_logp=b["ref"])
        if behav is None:
            del mb.tokens["behav_logp"]
        loss, m = fn(_Stage(ent), b["logp"], mb)
        assert torch.equal(loss, want), correction
        assert torch.equal(_grad(loss, b), want_grad), correction
        assert ("imp_weight_mean" in m) == (correction != "none")


def test_bad_choices_fail_when_the_call_is_built():
    assert behaviour_cap("decoupled") == IMP_CAP["decoupled"] and behaviour_cap("tis", 3) == 3.0
    with pytest.raises(ValueError, match="correction must be one of"):
        policy_call(LossCounts(tokens=1.0, seqs=1.0), temperature=1.0, correction="is")
    with pytest.raises(ValueError, match="imp_cap must exceed 1"):
        policy_call(LossCounts(tokens=1.0, seqs=1.0), temperature=1.0, correction="tis", imp_cap=1.0)


# --- the peers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["clip", "dual_clip", "gspo"])
@pytest.mark.parametrize("mode", MODES)
def test_tis_matches_verl(kind, mode):
    """verl's token-level TIS weights (threshold 2) multiplied into its per-token policy loss."""
    v = peers.verl()
    b = _offpolicy_batch(12)
    counts = _counts(b)
    low, high, c = 0.2, 0.28, 3.0
    for part in SPLITS:
        seqs, tok, cu = _select(b, part)
        mask = _padded(b, seqs, b["mask"].long(), 0)
        ref_w, _ = v.rollout_corr.compute_rollout_correction_weights(
            _padded(b, seqs, b["old"]) - _padded(b, seqs, b["behav"]), mask, rollout_is="token",
            rollout_is_threshold=IMP_CAP["tis"])
        cfg = peers.verl_actor_config(clip_ratio=0.2, clip_ratio_low=low, clip_ratio_high=high,
                                      clip_ratio_c=c if kind == "dual_clip" else 1e9,
                                      batch_num_tokens=counts.tokens, global_batch_size=counts.seqs,
                                      loss_scale_factor=counts.norm_len)
        ca = v.core_algos
        fn = ca.compute_policy_loss_gspo if kind == "gspo" else ca.compute_policy_loss_vanilla
        ref_loss, _ = fn(_padded(b, seqs, b["old"]), _padded(b, seqs, b["logp"]), _padded(b, seqs, b["adv"]),
                         mask, loss_agg_mode=mode, config=cfg, rollout_is_weights=ref_w)

        m_tok = b["mask"][tok]
        w, capped = behaviour_weights(b["old"][tok], b["behav"][tok], m_tok, "tis")
        torch.testing.assert_close(w[m_tok], unpad(ref_w, mask), **TOL)
        per_token, _ = policy_terms(b["logp"][tok], b["old"][tok], b["adv"][tok], m_tok, cu, kind=kind,
                                    clip_eps_low=low, clip_eps_high=high, clip_ratio_c=c)
        loss = aggregate(per_token * w, m_tok, cu, mode, counts)
        tol = TOL_EPS if mode == "seq-mean-token-mean" else TOL
        torch.testing.assert_close(loss, ref_loss, **tol)
        torch.testing.assert_close(_grad(loss, b), _grad(ref_loss, b), **tol)
        if part is None:
            assert capped.any() and not capped.all()


@pytest.mark.parametrize("kind", ["clip", "dual_clip"])
@pytest.mark.parametrize("cap", [None, 2.0])
def test_decoupled_matches_areal(kind, cap):
    """AReaL's ``ppo_actor_loss_fn`` with token-level rejection on the ratio (action "mask") on the
    packed batch; its normaliser is the batch's counted actions, so token-mean over those. AReaL
    computes the behaviour weight in fp32 (``.float()``): the proximal and behaviour log-probs are
    given as fp32 to both, so both exponentiate the same fp32 numbers (the weights are equal bit
    for bit) and the rest is float64 on both sides."""
    a = peers.areal()
    b = _offpolicy_batch(13)
    old, behav, mask = b["old"].float(), b["behav"].float(), b["mask"]
    upper = behaviour_cap("decoupled", cap)
    ref_loss, stat = a.functional.ppo_actor_loss_fn(
        b["logp"], old, behav, b["adv"], eps_clip=0.2, loss_mask=mask, eps_clip_higher=0.28,
        c_clip=3.0 if kind == "dual_clip" else None, cu_seqlens=b["cu"],
        rejection_sampling=a.RejectionSamplingConfig(level="token", action="mask", metric="ratio",
                                                     upper=upper))
    w, capped = behaviour_weights(old, behav, mask, "decoupled", cap)
    assert torch.equal(w, stat["behave_imp_weight"])
    assert _masked_frac(capped, mask) == stat["filtered_fraction"] > 0
    per_token, _ = policy_terms(b["logp"], old, b["adv"], mask, b["cu"], kind=kind, clip_eps_low=0.2,
                                clip_eps_high=0.28, clip_ratio_c=3.0)
    loss = aggregate(per_token * w, mask, b["cu"], "token-mean", _counts(b))
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(_grad(loss, b), _grad(ref_loss, b), **TOL)

