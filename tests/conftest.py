import pytest
import torch

from meshrl.testing.dist_pool import DistPool

_POOLS: dict[int, DistPool] = {}


@pytest.fixture(scope="session")
def dist_pool():
    """dist_pool(n) -> a gloo DistPool of n ranks, shared by the whole session."""
    def get(world_size: int) -> DistPool:
        if world_size not in _POOLS:
            _POOLS[world_size] = DistPool(world_size)
        return _POOLS[world_size]
    yield get
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """One torch thread per test: on a shared two-core machine a two-thread op's parallel regions
    wait for a descheduled sibling (measured here: chunked torch paths 15-25x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
