"""Reductions, SFT, Bradley–Terry, and the loss-normalisation contract, on hand-worked numbers."""
import math

import pytest
import torch

from meshrl.engine.algorithms.losses import (bradley_terry_loss, expand_to_tokens, ppo_policy_loss,
                                             ppo_value_loss, segment_sum, sequence_logps, sft_loss,
                                             token_mean)

LN2 = math.log(2.0)


def test_segment_sum_values_and_gradient():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], requires_grad=True)
    cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)  # the second sequence is empty
    out = segment_sum(x, cu)
    assert out.tolist() == [3.0, 0.0, 12.0, 6.0]
    out.backward(torch.tensor([1.0, 7.0, 10.0, 100.0]))
    assert x.grad.tolist() == [1.0, 1.0, 10.0, 10.0, 10.0, 100.0]


def test_segment_sum_accumulates_low_precision_in_fp32():
    # 3000 tokens of 1.0 in bf16: a bf16 running sum stalls at 256 (its ulp there is 2 > 1).
    x = torch.ones(3000, dtype=torch.bfloat16)
    out = segment_sum(x, torch.tensor([0, 3000], dtype=torch.int32))
    assert out.dtype == torch.float32 and out.item() == 3000.0


def test_expand_to_tokens_and_sequence_logps():
    cu = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    assert expand_to_tokens(torch.tensor([1.0, 2.0, 3.0]), cu).tolist() == [1, 1, 2, 2, 2, 3]
    logps = torch.tensor([-1.0, -2.0, float("-inf"), -3.0, -4.0, -5.0])
    mask = torch.tensor([True, True, False, True, True, True])
    # The masked -inf (a prompt position) must not leak into its sequence's sum.
    assert sequence_logps(logps, cu, mask).tolist() == [-3.0, -7.0, -5.0]


def test_token_mean_uses_the_global_count_and_ignores_masked_nans():
    x = torch.tensor([1.0, float("nan"), 2.0, 3.0])
    mask = torch.tensor([True, False, True, True])
    assert token_mean(x, mask).item() == pytest.approx(2.0)
    assert token_mean(x, mask, num_tokens=10).item() == pytest.approx(0.6)
    assert token_mean(x, torch.zeros(4, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="positive"):
        token_mean(x, mask, num_tokens=0)


def test_sft_loss_hand_worked():
    logprobs = torch.log(torch.tensor([0.5, 0.25, 0.125, 1.0], dtype=torch.float64))
    mask = torch.tensor([False, True, True, True])
    # NLL of the 3 response tokens: ln4 + ln8 + 0 = 5·ln2, over 3 tokens.
    loss, metrics = sft_loss(logprobs, mask)
    assert loss.item() == pytest.approx(5 * LN2 / 3, rel=1e-12)
    assert metrics["nll_sum"].item() == pytest.approx(5 * LN2, rel=1e-12)
    loss, _ = sft_loss(logprobs, mask, num_tokens=5)
    assert loss.item() == pytest.approx(LN2, rel=1e-12)


def test_bradley_terry_hand_worked():
    chosen = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    loss, metrics = bradley_terry_loss(chosen, rejected)
    per_pair = [math.log1p(math.exp(-2.0)), LN2, math.log1p(math.exp(2.0))]
    assert loss.item() == pytest.approx(sum(per_pair) / 3, rel=1e-12)
    assert metrics["accuracy"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert metrics["margin"].item() == pytest.approx(0.0)
    loss.backward()
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    # d/dr_w of −log σ(r_w − r_l) is −σ(r_l − r_w).
    assert chosen.grad.tolist() == pytest.approx([-sig(-2.0) / 3, -0.5 / 3, -sig(2.0) / 3])
    loss, _ = bradley_terry_loss(chosen, rejected, num_pairs=6)
    assert loss.item() == pytest.approx(sum(per_pair) / 6, rel=1e-12)


def test_bradley_terry_is_finite_for_a_huge_wrong_margin():
    loss, metrics = bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(100.0)
    assert metrics["accuracy"].item() == 0.0


# --- the loss-normalisation contract: microbatches with the global count = the whole batch ---

def _logps(w, x, labels):
    return torch.log_softmax(x @ w, dim=-1).gather(1, labels[:, None]).squeeze(1)


def _sft(w, x, labels, mask, extra, num_tokens):
    return sft_loss(_logps(w, x, labels), mask, num_tokens=num_tokens)[0]


def _ppo(w, x, labels, mask, extra, num_tokens):
    old_logp, adv = extra
    return ppo_policy_loss(_logps(w, x, labels), old_logp, adv, mask, num_tokens=num_tokens)[0]


def _value(w, x, labels, mask, extra, num_tokens):
    old_v, returns = extra
    values = (x @ w).sum(-1)
    return ppo_value_loss(values, old_v, returns, mask, value_clip=0.2, num_tokens=num_tokens)[0]


def _grad(fn, w, batch, num_tokens):
    w = w.clone().requires_grad_(True)
    fn(w, *batch, num_tokens).backward()
    return w.grad


@pytest.mark.parametrize("fn", [_sft, _ppo, _value], ids=["sft", "ppo_policy", "ppo_value"])
def test_microbatch_split_with_global_count_matches_whole_batch(fn):
    g = torch.Generator().manual_seed(0)
    n, h, v = 10, 4, 6
    w = torch.randn(h, v, generator=g, dtype=torch.float64)
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    with torch.no_grad():
        # Old log-probs 0.3 nats off so some tokens sit beyond the clip.
        extra = (_logps(w, x, labels) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64),
                 torch.randn(n, generator=g, dtype=torch.float64))
    batch = (x, labels, mask, extra)
    whole = _grad(fn, w, batch, None)
    parts = [slice(0, 3), slice(3, 10)]  # uneven: 2 and 6 counted tokens
    sub = lambda s: (x[s], labels[s], mask[s], tuple(e[s] for e in extra))  # noqa: E731
    split = sum(_grad(fn, w, sub(s), int(mask.sum())) for s in parts)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)
    # The contract matters: averaging per-microbatch means weights the 2-token part 3x too much.
    naive = sum(_grad(fn, w, sub(s), None) for s in parts) / len(parts)
    assert not torch.allclose(naive, whole, rtol=1e-6, atol=1e-9)
