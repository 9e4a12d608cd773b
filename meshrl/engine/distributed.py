"""Process-group start-up for torchrun or a single process (gloo on CPU, NCCL on GPU).

Why a store of our own under torchrun: torchrun's agent hosts one TCP store for the whole job
(``TORCHELASTIC_USE_AGENT_STORE``) and keeps it across worker restarts. ``init_process_group``
writes each rank's gloo address (or NCCL's unique id) into that store, so after a restart a new
worker can read a dead worker's entry before its replacement overwrites it, connect to a closed
port, and fail ("Gloo connectFullMesh failed ... Connection refused"; NCCL picks up a stale unique
id). Prefixing keys with ``TORCHELASTIC_RESTART_COUNT`` does not hold in general: that count is
kept per agent, and an agent whose workers were healthy re-joins without counting a restart, so
two nodes can disagree. Instead rank 0 of each attempt hosts a fresh store on a free port and
publishes ``host:port:token`` in the agent's store; the other ranks connect to what they read and
keep it only if it answers with the same token. Every worker of an earlier attempt is dead before
a new attempt starts (the agents stop them before the next rendezvous), so a stale entry names a
closed port, or a port reused by a store holding another token, and is read again.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
import uuid

import torch
import torch.distributed as dist

_PUBLISHED = "meshrl/attempt_store"
_TOKEN = "meshrl/attempt_token"


def grace_s(timeout_s: float) -> float:
    """How much longer than the run's watchdog a collective may wait before the process group's
    own timeout fires: meshrl's report (which rank, which call) comes first, the collective's
    error (or NCCL's abort) is the backstop."""
    return max(60.0, timeout_s)


def init_distributed(timeout_s: float = 1800.0) -> torch.device:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); return this rank's
    device. Collectives time out after ``timeout_s + grace_s(timeout_s)``."""
    use_gpu = torch.cuda.is_available() and os.environ.get("MESHRL_DEVICE", "") != "cpu"
    if use_gpu:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device(torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        # torchrun sets it; a hand launch gets the same: a failed NCCL collective aborts the
        # communicator and raises instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        timeout = datetime.timedelta(seconds=timeout_s + grace_s(timeout_s))
        backend = "nccl" if use_gpu else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            rank = int(os.environ["RANK"])
            dist.init_process_group(backend, store=attempt_store(rank, world_size, timeout),
                                    rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return device


def attempt_store(rank: int, world_size: int, timeout: datetime.timedelta,
                  probe_s: float = 1.0) -> dist.Store:
    """A store that only this attempt's workers use (see the module docstring)."""
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          world_size=world_size, is_master=False, timeout=timeout)
    if rank == 0:
        store = dist.TCPStore(_own_address(), 0, world_size=world_size, is_master=True,
                              timeout=timeout, wait_for_workers=False)
        token = uuid.uuid4().hex
        store.set(_TOKEN, token)
        agent.set(_PUBLISHED, f"{_own_address()}:{store.port}:{token}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        host, port, token = agent.get(_PUBLISHED).decode().rsplit(":", 2)
        try:
            store = dist.TCPStore(host, int(port), world_size=world_size, is_master=False,
                                  timeout=datetime.timedelta(seconds=probe_s))
            if store.get(_TOKEN).decode() == token:
                store.set_timeout(timeout)
                return store
        except (RuntimeError, dist.DistError):  # a closed port or a store without the token
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: no store of this attempt answered at {host}:{port} "
                               f"within {timeout.total_seconds():.0f} s (is rank 0 running?)")
        time.sleep(0.1)


def _own_address() -> str:
    """The address other nodes reach this host by: the interface that routes to the agent's
    store (no packet is sent: connecting a UDP socket only picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
        return s.getsockname()[0]


def default_store() -> dist.Store | None:
    """The default process group's store (None in a single process): the watchdog's channel."""
    if not dist.is_initialized():
        return None
    return dist.distributed_c10d._get_default_store()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def shutdown():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
