"""Pipeline schedules: 1F1B training and forward-only, over the stages of ``layout.pp_group``.

A schedule knows nothing of the model. It calls ``forward_step(batch, model) -> (output, loss_fn)``;
on a non-first stage it first hands the received activation to ``model.set_input_tensor(t)``
(Megatron's convention; the first stage gets ``None`` when the model has the method). A non-last
stage's ``output`` is the activation tensor for the next stage; on the last stage
``loss_fn(output) -> (loss, metrics)``. Losses arrive normalised by the global token count, so the
schedule sums them over microbatches and never divides.
"""
from __future__ import annotations

import collections
import contextlib

import torch
import torch.distributed as dist

from .layout import ParallelLayout
from .p2p import StageComm, comm_device


def _set_input(model, tensor, layout: ParallelLayout):
    if hasattr(model, "set_input_tensor"):
        model.set_input_tensor(tensor)
    elif not layout.is_first_stage:
        raise TypeError(f"{type(model).__name__} has no set_input_tensor(tensor): a non-first pipeline "
                        "stage needs it to receive its input activation")


class _Run1F1B:
    """State of one 1F1B pass: in-flight (input, output) pairs, losses and metrics."""

    def __init__(self, forward_step, microbatches, model, layout, no_sync, device):
        self.forward_step, self.microbatches, self.model = forward_step, microbatches, model
        self.layout, self.no_sync = layout, no_sync
        self.comm = StageComm(layout, device)
        self.metrics, self.total = [], None
        self.n_backward = 0

    def forward(self, index: int, inp):
        if inp is not None and inp.is_floating_point():
            inp.requires_grad_()
        _set_input(self.model, inp, self.layout)
        output, loss_fn = self.forward_step(self.microbatches[index], self.model)
        if not self.layout.is_last_stage:
            return output
        loss, metrics = loss_fn(output)
        self.metrics.append(metrics)
        self.total = loss.detach() if self.total is None else self.total + loss.detach()
        return loss

    def backward(self, inp, output, output_grad):
        last = self.n_backward == len(self.microbatches) - 1
        self.n_backward += 1
        ctx = self.no_sync() if self.no_sync is not None and not last else contextlib.nullcontext()
        with ctx:
            # On the last stage output is the scalar loss and output_grad None (a gradient of 1).
            torch.autograd.backward(output, grad_tensors=output_grad)
        if inp is None:
            return None
        return inp.grad if inp.grad is not None else torch.zeros_like(inp)


def train_1f1b(forward_step, microbatches: list, model, layout: ParallelLayout, *, no_sync=None,
               device=None):
    """One forward and backward over ``microbatches`` with the one-forward-one-backward schedule.

    Stage p runs min(pp - p - 1, M) warmup forwards, then alternates forward and backward, then
    drains the remaining backwards, so at most pp - p activations are alive. ``no_sync`` (e.g.
    ``DistributedOptimizer.no_sync``) is a context-manager factory entered for every backward but
    the last, so overlapped grad reductions start only when the final microbatch's grads land.
    With pp=1 this is plain gradient accumulation.

    Returns ``(metrics per microbatch, summed loss)`` on the last stage, ``(None, None)`` elsewhere.
    """
    run = _Run1F1B(forward_step, microbatches, model, layout, no_sync, device)
    comm, M = run.comm, len(microbatches)
    warmup = min(layout.pp_size - layout.pp_rank - 1, M)
    remaining = M - warmup
    inputs, outputs = collections.deque(), collections.deque()
    for i in range(warmup):
        inp = comm.recv_forward()
        out = run.forward(i, inp)
        comm.send_forward(out)
        inputs.append(inp)
        outputs.append(out)
    inp = comm.recv_forward() if remaining > 0 else None
    for i in range(remaining):
        out = run.forward(warmup + i, inp)
        inputs.append(inp)
        outputs.append(out)
        out_grad = comm.send_forward_recv_backward(out, outputs[0])
        in_grad = run.backward(inputs.popleft(), outputs.popleft(), out_grad)
        if i == remaining - 1:
            comm.send_backward(in_grad)
            inp = None
        else:
            inp = comm.send_backward_recv_forward(in_grad)
    for _ in range(warmup):
        inp, out = inputs.popleft(), outputs.popleft()
        out_grad = comm.recv_backward(out)
        comm.send_backward(run.backward(inp, out, out_grad))
    if hasattr(model, "set_input_tensor"):
        model.set_input_tensor(None)  # drop the reference to the last received activation
    if not layout.is_last_stage:
        return None, None
    return run.metrics, run.total


@torch.no_grad()
def forward_only(forward_step, microbatches: list, model, layout: ParallelLayout, *, device=None):
    """Forward every microbatch through the pipeline without autograd.

    Returns, on the last stage, one entry per microbatch: ``loss_fn(output)`` when ``forward_step``
    returns a ``loss_fn``, else the raw output. Other stages return None.
    """
    comm = StageComm(layout, device)
    results = []
    for mb in microbatches:
        inp = comm.recv_forward()
        _set_input(model, inp, layout)
        output, loss_fn = forward_step(mb, model)
        if layout.is_last_stage:
            results.append(loss_fn(output) if loss_fn is not None else output)
        else:
            comm.send_forward(output)
    if hasattr(model, "set_input_tensor"):
        model.set_input_tensor(None)
    return results if layout.is_last_stage else None


def to_host(obj):
    """Tensors inside a picklable object moved to CPU, so no rank unpickles another's device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def broadcast_from_last_stage(obj, layout: ParallelLayout, *, device=None):
    """``obj`` from the last pipeline stage, returned on every stage of this rank's pipeline.

    A tensor travels as a tensor (shape sent first) and arrives on ``device`` (default: the
    backend's communication device); anything else is pickled, with tensors inside moved to CPU.
    Collective over ``layout.pp_group``; other stages pass any placeholder (e.g. None).
    """
    if layout.pp_size == 1:
        return obj
    group = layout.pp_group
    src = layout.stage_rank(layout.pp_size - 1)
    last = layout.is_last_stage
    if last:
        is_tensor = isinstance(obj, torch.Tensor)
        meta = ("tensor", tuple(obj.shape), obj.dtype) if is_tensor else ("obj", to_host(obj))
    box = [meta if last else None]
    dist.broadcast_object_list(box, src=src, group=group)
    kind, *rest = box[0]
    if kind == "obj":
        return obj if last else rest[0]
    device = torch.device(device) if device is not None else comm_device(group)
    t = obj.detach().contiguous() if last else torch.empty(rest[0], dtype=rest[1], device=device)
    dist.broadcast(t, src=src, group=group)
    return obj if last else t


def fill_from_last_stage(t: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """``t`` overwritten in place, on every stage of this rank's pipeline, with the last stage's
    ``t`` (the same shape and dtype everywhere, so nothing but the data travels; a preallocated
    buffer stays where it is). Collective over ``layout.pp_group``; returns ``t``."""
    if layout.pp_size > 1:
        dist.broadcast(t, src=layout.stage_rank(layout.pp_size - 1), group=layout.pp_group)
    return t
