import pytest
import torch

from meshrl.kernels import gae

from oracles import gae_oracle


def _cu(lens, device):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu.to(device)


def _golden_batch(device):
    # Sequence 0 ended (EOS at its last action, reward 1 there); sequence 1 was truncated and
    # bootstraps from the critic's value 2.0 of the state after its last action.
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.5], device=device)
    values = torch.tensor([0.5, 0.6, 0.7, 1.0, 1.5], device=device)
    return rewards, values, _cu([3, 2], device), torch.tensor([0.0, 2.0], device=device)


def test_golden_monte_carlo_when_gamma_lambda_one(device):
    r, v, cu, boot = _golden_batch(device)
    adv, ret = gae(r, v, cu, bootstrap_values=boot, gamma=1.0, lam=1.0)
    # returns-to-go: [1, 1, 1] for the ended sequence, [0 + 0.5 + 2, 0.5 + 2] with the bootstrap.
    torch.testing.assert_close(ret.cpu(), torch.tensor([1.0, 1.0, 1.0, 2.5, 2.5]))
    torch.testing.assert_close(adv.cpu(), torch.tensor([0.5, 0.4, 0.3, 1.5, 1.0]))


def test_golden_td_errors_when_lambda_zero(device):
    r, v, cu, boot = _golden_batch(device)
    adv, _ = gae(r, v, cu, bootstrap_values=boot, gamma=0.9, lam=0.0)
    # δ_t = r_t + 0.9·V_{t+1} − V_t; V after the ended sequence is 0, after the truncated one 2.0.
    expected = [0 + 0.9 * 0.6 - 0.5, 0 + 0.9 * 0.7 - 0.6, 1 - 0.7, 0 + 0.9 * 1.5 - 1.0, 0.5 + 0.9 * 2 - 1.5]
    torch.testing.assert_close(adv.cpu(), torch.tensor(expected))


def test_golden_half_discount(device):
    r, v, cu, boot = _golden_batch(device)
    adv, _ = gae(r, v, cu, bootstrap_values=boot, gamma=0.5, lam=0.5)
    # Ended sequence: δ = [-0.2, -0.25, 0.3]; A2 = 0.3, A1 = -0.25 + 0.25·0.3, A0 = -0.2 + 0.25·A1.
    a1 = -0.25 + 0.25 * 0.3
    # Truncated: δ = [0 + 0.5·1.5 − 1, 0.5 + 0.5·2 − 1.5] = [-0.25, 0]; A1 = 0, A0 = -0.25.
    expected = [-0.2 + 0.25 * a1, a1, 0.3, -0.25, 0.0]
    torch.testing.assert_close(adv.cpu(), torch.tensor(expected))


def test_bootstrap_defaults_to_zero_and_only_touches_its_sequence(device):
    r, v, cu, boot = _golden_batch(device)
    plain, _ = gae(r, v, cu, gamma=0.9, lam=0.8)
    zero, _ = gae(r, v, cu, bootstrap_values=torch.zeros(2, device=device), gamma=0.9, lam=0.8)
    booted, _ = gae(r, v, cu, bootstrap_values=boot, gamma=0.9, lam=0.8)
    torch.testing.assert_close(plain, zero)
    torch.testing.assert_close(booted[:3], plain[:3])  # the ended sequence ignores the other's value
    assert (booted[3:] > plain[3:]).all()


CASES = {
    "odd-mix": [1, 5, 0, 4000, 3, 70],  # length-1, empty, and a 4000-token sequence
    "B=1-len1": [1],
    "B=1-long": [4000],
    "many": [int(n) for n in torch.randint(1, 300, (64,), generator=torch.Generator().manual_seed(1))],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_matches_float64_oracle(device, case, dtype, gamma, lam):
    lens = CASES[case]
    g = torch.Generator().manual_seed(0)
    n = sum(lens)
    r = torch.randn(n, generator=g).to(dtype)
    v = torch.randn(n, generator=g).to(dtype)
    boot = torch.randn(len(lens), generator=g).to(dtype)
    adv, ret = gae(r.to(device), v.to(device), _cu(lens, device), bootstrap_values=boot.to(device),
                   gamma=gamma, lam=lam)
    assert adv.dtype == ret.dtype == torch.float32
    o_adv, o_ret = gae_oracle(r, v, _cu(lens, "cpu"), boot, gamma, lam)
    # The oracle reads the same (bf16-rounded) inputs, so only fp32 accumulation differs from it:
    # sums of up to 4000 terms, tolerance relative to the largest magnitude.
    tol = 2e-6 * max(1.0, float(o_ret.abs().max())) + 1e-6
    torch.testing.assert_close(adv.cpu().double(), o_adv, atol=tol, rtol=0)
    torch.testing.assert_close(ret.cpu().double(), o_ret, atol=tol, rtol=0)


def test_long_sequence_with_discount_does_not_underflow_to_nan(device):
    n = 33000  # past 32k, where γλ^n underflows in fp32
    r = torch.ones(n, device=device)
    v = torch.zeros(n, device=device)
    adv, _ = gae(r, v, _cu([n], device), gamma=0.99, lam=0.95)
    assert torch.isfinite(adv).all()
    # Far from the end A_t is the geometric series Σ (γλ)^k r = 1 / (1 − γλ).
    torch.testing.assert_close(adv[0].cpu(), torch.tensor(1 / (1 - 0.99 * 0.95)), rtol=1e-5, atol=0)
    torch.testing.assert_close(adv[-1].cpu(), torch.tensor(1.0))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same 1D shape"):
        gae(torch.zeros(3), torch.zeros(4), torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="bootstrap"):
        gae(torch.zeros(3), torch.zeros(3), torch.tensor([0, 3], dtype=torch.int32),
            bootstrap_values=torch.zeros(2))
