import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """Each device with its default path: torch on CPU, the Triton kernels on CUDA."""
    monkeypatch.delenv("MESHRL_KERNELS", raising=False)
    return torch.device(request.param)


