"""DPO, IPO, label smoothing and DPO+SFT on hand-worked numbers."""
import math

import pytest
import torch

from meshrl.engine.algorithms.losses import dpo_loss

LN2 = math.log(2.0)


def _logps(pc, pr, rc, rr, grad=False):
    t = [torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr)]
    if grad:
        t[0].requires_grad_(True)
    return t


def softplus(z):
    return math.log1p(math.exp(z))


def test_zero_margin_is_log2_even_when_the_policy_moved():
    # Both responses' log-ratios moved by +0.25 (exact in binary): the margin h is still 0.
    args = _logps([-1.75, -4.75], [-2.75, -0.75], [-2.0, -5.0], [-3.0, -1.0])
    loss, m = dpo_loss(*args, beta=0.1)
    assert loss.item() == pytest.approx(LN2, rel=1e-12)
    assert m["rewards_chosen"].item() == pytest.approx(0.025)
    assert m["rewards_rejected"].item() == pytest.approx(0.025)
    assert m["rewards_margin"].item() == 0.0
    assert m["rewards_accuracy"].item() == 0.0


def test_sigmoid_loss_value_metrics_and_gradient():
    # Chosen log-ratio +6, rejected −4: h = 10, β·h = 1.
    args = _logps([-4.0], [-9.0], [-10.0], [-5.0], grad=True)
    loss, m = dpo_loss(*args, beta=0.1)
    assert loss.item() == pytest.approx(softplus(-1.0), rel=1e-12)
    assert m["rewards_chosen"].item() == pytest.approx(0.6)
    assert m["rewards_rejected"].item() == pytest.approx(-0.4)
    assert m["rewards_margin"].item() == pytest.approx(1.0)
    assert m["rewards_accuracy"].item() == 1.0
    loss.backward()
    # d/dπ_c of −log σ(βh) = −β·σ(−βh).
    assert args[0].grad.item() == pytest.approx(-0.1 / (1 + math.e), rel=1e-12)


def test_label_smoothing_mixes_both_labels():
    args = _logps([-4.0], [-9.0], [-10.0], [-5.0])
    loss, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * softplus(-1.0) + 0.1 * softplus(1.0), rel=1e-12)


def test_ipo_targets_half_inverse_beta():
    # β = 0.1: the IPO target margin is 1/(2β) = 5.
    at_target = _logps([-1.0], [-6.0], [-1.0], [-1.0])
    assert dpo_loss(*at_target, beta=0.1, loss_type="ipo")[0].item() == pytest.approx(0.0)
    args = _logps([-1.0], [-4.0], [-1.0], [-1.0], grad=True)  # h = 3
    loss, _ = dpo_loss(*args, beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx(4.0)
    loss.backward()
    assert args[0].grad.item() == pytest.approx(-4.0)  # 2·(h − 5)


def test_dpo_plus_sft_adds_the_chosen_nll():
    args = _logps([-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0])
    nll = torch.tensor(2.0, requires_grad=True)
    loss, m = dpo_loss(*args, beta=0.1, sft_coef=0.5, chosen_nll=nll)
    assert loss.item() == pytest.approx(LN2 + 1.0, rel=1e-12)
    assert m["pref_loss"].item() == pytest.approx(LN2, rel=1e-12)
    loss.backward()
    assert nll.grad.item() == pytest.approx(0.5)
    per_pair = torch.tensor([1.0, 3.0], dtype=torch.float64)  # reduced like the pairs: mean 2
    loss, _ = dpo_loss(*args, beta=0.1, sft_coef=0.5, chosen_nll=per_pair)
    assert loss.item() == pytest.approx(LN2 + 1.0, rel=1e-12)


def test_num_pairs_is_the_global_denominator():
    args = _logps([-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0])
    assert dpo_loss(*args, num_pairs=4)[0].item() == pytest.approx(2 * LN2 / 4, rel=1e-12)


def test_bf16_inputs_compute_in_fp32():
    args = [torch.tensor([v], dtype=torch.bfloat16) for v in (-4.0, -9.0, -10.0, -5.0)]
    loss, _ = dpo_loss(*args, beta=0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(softplus(-1.0), rel=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"loss_type": "hinge"}, "loss_type"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
    ({"sft_coef": 1.0}, "chosen_nll"),
    ({"beta": 0.0}, "beta"),
])
def test_bad_options_are_one_line_errors(kwargs, match):
    args = _logps([-1.0], [-1.0], [-1.0], [-1.0])
    with pytest.raises(ValueError, match=match):
        dpo_loss(*args, **kwargs)


def test_length_normalised_pair_logps_are_per_token_means():
    """dpo.length_normalize: a response's log-prob is its mean per token (TRL's IPO) instead of its
    sum (DPO; OpenRLHF). Pairs packed chosen, rejected: prompt [5, 6] then responses of 3 and 1
    tokens; the loss mask covers the positions that score response tokens."""
    from meshrl.engine.algorithms.calls import _pair_logps
    from meshrl.engine.batch import pack
    from meshrl.engine.runtime.dpo import length_normalized
    mb = pack([[5, 6, 7, 8, 9], [5, 6, 4]], loss_from=[1, 1])
    logp = torch.arange(1.0, 9.0)  # position t's log-prob is t + 1 (positions 0..7)
    # chosen scores tokens 7, 8, 9 at positions 1, 2, 3: sum 2+3+4 = 9, mean 3;
    # rejected scores token 4 at position 6 (its sequence starts at 5): sum = mean = 7
    (sc,), (sr,) = _pair_logps(logp, mb)
    (mc,), (mr,) = _pair_logps(logp, mb, length_normalize=True)
    assert (sc.item(), sr.item(), mc.item(), mr.item()) == (9.0, 7.0, 3.0, 7.0)
    d = type("D", (), {"loss_type": "ipo", "length_normalize": None})
    assert length_normalized(d) is True
    d.loss_type = "sigmoid"
    assert length_normalized(d) is False
    d.length_normalize = True
    assert length_normalized(d) is True
