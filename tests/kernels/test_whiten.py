import pytest
import torch

from meshrl.kernels import masked_whiten


def test_masked_mean_and_biased_variance(device):
    x = torch.tensor([1.0, 2.0, 3.0, 100.0], device=device)
    mask = torch.tensor([1, 1, 1, 0], device=device)
    out = masked_whiten(x, mask, eps=0.0)
    # Masked elements 1, 2, 3: mean 2, biased variance 2/3.
    expected = (torch.tensor([1.0, 2.0, 3.0, 100.0]) - 2.0) / (2.0 / 3.0) ** 0.5
    torch.testing.assert_close(out.cpu(), expected)
    kept = masked_whiten(x, mask, eps=0.0, shift_mean=False)
    torch.testing.assert_close(kept.cpu(), expected + 2.0)


def test_unmasked_matches_plain_formula(device):
    x = torch.randn(7, 9, device=device, dtype=torch.bfloat16)
    xf = x.float()
    expected = (xf - xf.mean()) * torch.rsqrt(xf.var(unbiased=False) + 1e-8)
    torch.testing.assert_close(masked_whiten(x), expected)


def test_empty_mask_is_an_error():
    with pytest.raises(ValueError, match="no elements"):
        masked_whiten(torch.randn(3), torch.zeros(3, dtype=torch.bool))
