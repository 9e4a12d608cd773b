import pytest
import torch
import torch.distributed as dist


def _allreduce_rank():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def _boom():
    raise ValueError("planted")


def test_pool_runs_collectives(dist_pool):
    assert dist_pool(2).run(_allreduce_rank) == [1.0, 1.0]


def test_pool_reports_errors_and_recovers(dist_pool):
    pool = dist_pool(2)
    with pytest.raises(RuntimeError, match="planted"):
        pool.run(_boom)
    assert pool.run(_allreduce_rank) == [1.0, 1.0]
