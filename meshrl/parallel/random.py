"""Layout-independent initialisation: the same seed gives the same full weights in every layout.

Each index along a parameter's split dimension draws from its own generator, seeded by (seed, name,
index), so a shard is generated without the rest of the full tensor and any split agrees with any
other. Generation runs on a CPU generator and is copied to the parameter's device, which makes it
identical on CPU and CUDA. (meshrl models have no dropout, so no per-rank RNG streams are needed.)
"""
from __future__ import annotations

import zlib

import torch

from .sharding import ShardSpec


def _seed_for(seed: int, name: str, index: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + index) % (2**63 - 1)


def _draw(shape, seed: int, std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32) * std


@torch.no_grad()
def init_shard_(param: torch.Tensor, spec: ShardSpec, seed: int, std: float) -> torch.Tensor:
    """Fill ``param`` (shape ``spec.local_shape``) with its slice of the seeded full tensor N(0, std²);
    padding rows are zeroed."""
    if spec.dim is None:
        param.copy_(_draw(spec.full_shape, _seed_for(seed, spec.name, 0), std))
        return param
    d = spec.dim
    slab_shape = spec.full_shape[:d] + spec.full_shape[d + 1:]
    out = torch.zeros(spec.local_shape, dtype=torch.float32)
    for i in range(spec.start, spec.valid_stop):
        out.select(d, i - spec.start).copy_(_draw(slab_shape, _seed_for(seed, spec.name, i), std))
    param.copy_(out)
    return param
