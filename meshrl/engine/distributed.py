"""Process-group start-up for torchrun or a single process (gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_distributed(timeout_s: float = 1800.0) -> torch.device:
    """Join the process group when launched by torchrun; return this rank's device."""
    use_gpu = torch.cuda.is_available() and os.environ.get("MESHRL_DEVICE", "") != "cpu"
    if use_gpu:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device(torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_gpu else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def shutdown():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
