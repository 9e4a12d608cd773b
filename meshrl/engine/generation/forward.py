"""A forward pass through a model's pipeline without autograd bookkeeping: what both engines'
prefills (and the reference engine's decode steps) run, and what the model parity tests call."""
from __future__ import annotations

import torch

from meshrl.parallel import mappings
from meshrl.parallel.p2p import exchange_stages


def param_dtype(stage) -> torch.dtype:
    return next(stage.parameters()).dtype


def stage_pass(stage, ids, meta, cache=None, hidden_shape=None, forward=None):
    """One forward pass through the pipeline; the last stage returns its hidden states, other
    stages None. ``hidden_shape`` (what the previous stage sends) defaults to [N, hidden];
    ``forward`` (default: the stage itself) is called as ``forward(ids, meta, cache)``."""
    hidden_shape = hidden_shape or (ids.numel(), stage.cfg.hidden_size)
    layout = stage.layout
    if not layout.is_first_stage:
        x = torch.empty(hidden_shape, dtype=param_dtype(stage), device=ids.device)
        exchange_stages(layout, recvs=[(x, layout.pp_rank - 1)])
        stage.set_input_tensor(x)
    h = (forward or stage)(ids, meta, cache)
    if not layout.is_last_stage:
        exchange_stages(layout, sends=[(h.contiguous(), layout.pp_rank + 1)])
        return None
    return h


def full_logits(stage, h):
    """The last stage's logits over the whole vocabulary (gathered over tp, padding cut)."""
    logits = mappings.all_gather_dim(stage.logits(h), -1, stage.layout.tp_group)
    return logits[:, :stage.cfg.vocab_size]
