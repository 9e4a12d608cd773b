"""Point-to-point transfer of activations and their gradients between adjacent pipeline stages.

Packed sequences change the token count per microbatch, so a forward activation travels as a small
int64 header (rank, dtype, shape) followed by the data. A backward gradient needs no header: it has
the shape and dtype of the activation this stage sent forward for the same microbatch.

Every exchange is two ``batch_isend_irecv`` rounds (headers, then data) with one neighbour. Grouping a
step's sends and receives lets both sides post them in any order without deadlock (NCCL runs grouped
p2p together; separately posted NCCL sends to the same peer would serialise on one stream), and the
schedules pair their steps as Megatron's do, so each round meets the neighbour's matching round.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import ParallelLayout

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)
_MAX_DIMS = 6
_HEADER_LEN = 2 + _MAX_DIMS


def comm_device(group) -> torch.device:
    """The device a backend communicates from: host memory for gloo, the current accelerator else."""
    if group is None or dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    acc = torch.accelerator.current_accelerator()
    return torch.device(acc.type, torch.accelerator.current_device_index())


def encode_header(t: torch.Tensor, device) -> torch.Tensor:
    if t.dim() > _MAX_DIMS:
        raise ValueError(f"activation has {t.dim()} dims; the pipeline sends at most {_MAX_DIMS}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"activation dtype {t.dtype} is not one the pipeline can send ({_DTYPES})")
    vals = [t.dim(), _DTYPES.index(t.dtype), *t.shape]
    vals += [0] * (_HEADER_LEN - len(vals))
    return torch.tensor(vals, dtype=torch.int64, device=device)


def decode_header(h: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    vals = h.tolist()
    ndim = vals[0]
    return tuple(vals[2:2 + ndim]), _DTYPES[vals[1]]


class StageComm:
    """This rank's links to the previous and next stage of its pipeline (``layout.pp_group``)."""

    def __init__(self, layout: ParallelLayout, device=None):
        self.group = layout.pp_group
        self.device = torch.device(device) if device is not None else comm_device(self.group)
        p, n = layout.pp_rank, layout.pp_size
        self.prev = layout.stage_rank(p - 1) if p > 0 else None
        self.next = layout.stage_rank(p + 1) if p < n - 1 else None

    def _round(self, sends, recvs):
        ops = [dist.P2POp(dist.isend, t, peer, self.group) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, self.group) for t, peer in recvs]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def exchange(self, peer, *, send_fwd=None, recv_fwd=False, send_bwd=None, recv_bwd_like=None):
        """One step with ``peer``: optionally send an activation / a gradient and receive an
        activation (shape from its header) / a gradient shaped like ``recv_bwd_like``."""
        if peer is None:
            return None, None
        fwd_out = send_fwd.detach().contiguous() if send_fwd is not None else None
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device) if recv_fwd else None
        if fwd_out is not None or recv_fwd:
            self._round([(encode_header(fwd_out, self.device), peer)] if fwd_out is not None else [],
                        [(header, peer)] if recv_fwd else [])
        sends, recvs = [], []
        if fwd_out is not None:
            sends.append((fwd_out, peer))
        if send_bwd is not None:
            sends.append((send_bwd.detach().contiguous(), peer))
        fwd_in = bwd_in = None
        if recv_fwd:
            shape, dtype = decode_header(header)
            fwd_in = torch.empty(shape, dtype=dtype, device=self.device)
            recvs.append((fwd_in, peer))
        if recv_bwd_like is not None:
            bwd_in = torch.empty(recv_bwd_like.shape, dtype=recv_bwd_like.dtype, device=self.device)
            recvs.append((bwd_in, peer))
        self._round(sends, recvs)
        return fwd_in, bwd_in

    # Megatron's pairings: each call talks to one neighbour and meets its mirror image there.
    def recv_forward(self):
        return self.exchange(self.prev, recv_fwd=True)[0]

    def send_forward(self, output):
        self.exchange(self.next, send_fwd=output)

    def recv_backward(self, output):
        return self.exchange(self.next, recv_bwd_like=output)[1]

    def send_backward(self, input_grad):
        self.exchange(self.prev, send_bwd=input_grad)

    def send_forward_recv_backward(self, output, grad_like):
        """``grad_like``: the oldest activation still waiting for its gradient, not ``output``."""
        return self.exchange(self.next, send_fwd=output, recv_bwd_like=grad_like)[1]

    def send_backward_recv_forward(self, input_grad):
        return self.exchange(self.prev, send_bwd=input_grad, recv_fwd=True)[0]


def exchange_stages(layout: ParallelLayout, sends=(), recvs=()):
    """One batched round of fixed-shape transfers on this rank's pipeline: ``sends`` and ``recvs``
    are (tensor, stage index) pairs (the receiving tensors are filled in place). For traffic whose
    shapes both sides know already (generation's decode ring), so no header travels. On NCCL, as
    for ``StageComm``'s rounds, every rank of the group should enter its first batched p2p (the
    group's communicator is set up there): generation's first pp-group call is a prefill, which
    every stage enters."""
    group = layout.pp_group
    ops = [dist.P2POp(dist.isend, t, layout.stage_rank(s), group) for t, s in sends]
    ops += [dist.P2POp(dist.irecv, t, layout.stage_rank(s), group) for t, s in recvs]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
