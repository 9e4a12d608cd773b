import pytest
import torch

from meshrl.kernels.dispatch import use_triton


def test_defaults_to_torch_off_cuda(monkeypatch):
    monkeypatch.delenv("MESHRL_KERNELS", raising=False)
    assert not use_triton(torch.zeros(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_defaults_to_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("MESHRL_KERNELS", raising=False)
    x = torch.zeros(2, device=torch.device(torch.cuda.current_device()))
    assert use_triton(x)
    assert not use_triton(x, torch.zeros(2))  # mixed devices fall back to torch


def test_environment_forces_either_path(monkeypatch):
    monkeypatch.setenv("MESHRL_KERNELS", "triton")
    assert use_triton(torch.zeros(2))
    monkeypatch.setenv("MESHRL_KERNELS", " Torch ")
    assert not use_triton(torch.zeros(2))


def test_unknown_choice_is_an_error(monkeypatch):
    monkeypatch.setenv("MESHRL_KERNELS", "cutlass")
    with pytest.raises(ValueError, match="MESHRL_KERNELS"):
        use_triton(torch.zeros(2))
