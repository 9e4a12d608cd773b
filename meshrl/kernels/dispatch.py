"""Choose the Triton kernel or the torch path for a call.

``MESHRL_KERNELS=triton|torch`` forces one; unset, CUDA tensors take Triton and everything else the
torch path. The variable is read on every call rather than cached, so tests and benchmarks can flip it
without reloading modules (and there is no module state to go stale).
"""
from __future__ import annotations

import os

import torch

_CHOICES = ("triton", "torch")


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when this call should run the Triton kernels."""
    forced = os.environ.get("MESHRL_KERNELS", "").strip().lower()
    if forced:
        if forced not in _CHOICES:
            raise ValueError(f"MESHRL_KERNELS must be one of {_CHOICES}, got {forced!r}")
        return forced == "triton"
    return all(t.is_cuda for t in tensors)

