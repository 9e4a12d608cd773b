"""A pool of gloo worker processes that runs many test cases per spawn.

Spawning 8 ranks costs seconds on a small machine, so tests start one pool per world size and send it
module-level functions to run on every rank. A case that raises or times out marks the pool broken;
the next case gets a fresh pool, so one failure does not poison the rest.
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results, timeout_s: float):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = pickle.loads(item)
        try:
            out = ("ok", fn(*args, **kwargs))
        except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
            out = ("error", traceback.format_exc())
        _release_groups()
        try:
            results.put((rank, pickle.dumps(out)))
        except Exception:  # noqa: BLE001 - an unpicklable result is reported, not lost
            results.put((rank, pickle.dumps(("error", traceback.format_exc()))))
    dist.destroy_process_group()


def _release_groups():
    """Destroy the process groups a task made (every ParallelLayout makes its own). A worker lives
    for the whole test session, and each gloo group keeps three threads: hundreds of leftover
    groups made the machine spend most of its time in the kernel and the suite crawl."""
    world = dist.group.WORLD
    for pg in list(dist.distributed_c10d._world.pg_map):
        if pg is not world:
            try:
                dist.destroy_process_group(pg)
            except Exception:  # noqa: BLE001 - a group torch already tore down
                pass


class DistPool:
    def __init__(self, world_size: int, timeout_s: float = 300.0):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._procs = None

    def _start(self):
        ctx = mp.get_context("spawn")
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, self.world_size, port, self._tasks[r], self._results,
                                         self.timeout_s))
                       for r in range(self.world_size)]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results in rank order."""
        if self._procs is None or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        payload = pickle.dumps((fn, args, kwargs))
        for q in self._tasks:
            q.put(payload)
        out: list = [None] * self.world_size
        errors = []
        try:
            for _ in range(self.world_size):
                rank, data = self._results.get(timeout=self.timeout_s)
                status, value = pickle.loads(data)
                if status == "ok":
                    out[rank] = value
                else:
                    errors.append(f"rank {rank}:\n{value}")
                    break  # the other ranks may be stuck in a collective with the failed one
        except queue.Empty:
            errors.append(f"timed out after {self.timeout_s}s waiting for ranks")
        if errors:
            self.close()
            raise RuntimeError("distributed case failed on " + "\n".join(errors))
        return out

    def close(self):
        if self._procs is None:
            return
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self._procs = None
