import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """Each device with its default path: torch on CPU, the Triton kernels on CUDA."""
    monkeypatch.delenv("MESHRL_KERNELS", raising=False)
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    # On a shared two-core machine every parallel region of a two-thread op waits for a descheduled
    # sibling; measured here, that made the chunked torch paths 25× slower. Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
