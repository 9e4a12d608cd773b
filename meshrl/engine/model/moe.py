"""Mixture of experts: the routed SwiGLU MLP of Qwen3-MoE and Mixtral, expert-parallel over a
layout's ep group.

One sparse layer: the router (``gate``, fp32 logits and softmax) picks each token's top-k experts
(weights renormalised to sum to 1 when ``norm_topk_prob``); each expert is a SwiGLU MLP whose gate/up
rows and down columns are split over tp like the dense MLP's. Under ep, the ep ranks of a layout
(consecutive dp indices, each with its own tokens) hold ``num_experts / ep`` experts each: a rank
sorts its (token, expert) pairs by expert, sends each expert's rows to the rank holding it and gets
the outputs back with two all-to-alls, and sums each token's k outputs times its routing weights in
fp32, in expert order (transformers' order), the same on every rank and every run.

Parameter names follow the checkpoints': ``mlp.gate.weight`` and ``mlp.experts.J.{gate,up,down}_proj``
(Qwen3-MoE), ``block_sparse_moe.gate.weight`` and ``block_sparse_moe.experts.J.w{1,3,2}`` (Mixtral).
An expert's weights exist only on the ep rank holding expert J; each carries its ShardSpec (its
tp split) and ``expert_parallel = True`` (its gradient is summed over the ranks holding the same
experts, ``layout.edp_group``, not over all of dp).

Training adds the load-balancing loss (and optionally the router z-loss) through ``RouterLosses``:
inside ``RouterLosses.step``, each sparse layer's forward attaches its loss to its output's graph, so
no schedule or loss function changes, and records the router statistics the metrics report.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from meshrl.parallel import mappings
from meshrl.parallel.layers import ColumnParallelLinear, RowParallelLinear, replicated_param

# model_type -> (block name, (gate, up, down) names inside an expert)
EXPERT_NAMES = {"qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
                "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}


def block_name(cfg) -> str:
    """A sparse layer's module name in the checkpoint."""
    return EXPERT_NAMES[cfg.model_type][0]


def route(logits: torch.Tensor, k: int, normalise: bool):
    """fp32 router logits [N, E] -> (probs [N, E], expert ids [N, k] ascending, weights [N, k])."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    if normalise:
        w = w / w.sum(-1, keepdim=True)
    # experts in index order: the reference adds each token's outputs expert by expert
    idx, order = idx.sort(-1)
    return probs, idx, w.gather(-1, order)


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch-style E·Σ_e f_e·P_e, f_e the routed (token, slot) pairs per token (``counts`` [E]
    of them over the ``probs.shape[0]`` tokens) and P_e the mean router probability:
    transformers' load_balancing_loss_func for one layer."""
    f = counts.to(probs.dtype) / probs.shape[0]
    return counts.numel() * (f * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean squared log-partition of the router logits."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


class _AttachLoss(torch.autograd.Function):
    """Identity on ``x``; backward gives ``loss`` a gradient of 1, i.e. adds it to the objective
    of whatever is differentiated through ``x`` (the pipeline schedules need not know)."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.loss_shape = loss.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g, torch.ones(ctx.loss_shape, dtype=torch.float32, device=g.device)


class RouterLosses:
    """One model stage's router losses and statistics during a training step.

    ``step(token_total, aux_coef, z_coef, device)`` opens a step: each sparse layer's forward then
    adds ``coef · (n / token_total) · loss / n_sparse_layers`` for its n tokens, so the added loss
    is the token-weighted mean over the step's microbatches (every one of every dp rank) of each
    microbatch's mean over the sparse layers. The weighting does not depend on the split, the loss
    does: f and P are a microbatch's (as Megatron computes them), and transformers pools every
    layer's router logits into one loss where this takes the layers' mean (which pipeline stages
    compute apart); for one layer and one microbatch the two are the same. Outside a step
    (inference, generation, recomputation in backward) nothing is added or recorded.
    """

    def __init__(self, cfg):
        self.num_experts = cfg.num_experts
        self.layers = cfg.moe_layers
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self._open = None
        self._stats = None  # per sparse layer: tokens per expert, the aux and z terms (a step's)

    @contextlib.contextmanager
    def step(self, token_total: float, aux_coef: float, z_coef: float = 0.0, device=None):
        n_rows = len(self.layers)
        self._stats = torch.zeros(n_rows, self.num_experts + 2, dtype=torch.float64,
                                  device=device)
        self._open = (float(token_total), float(aux_coef), float(z_coef))
        try:
            yield self
        finally:
            self._open = None

    def attach(self, x, layer: int, logits, probs, counts, *, tp_size: int, record: bool):
        """``x`` with this layer's losses attached (when a step is open and grad is enabled);
        ``counts`` [E]: the (token, slot) pairs routed to each expert."""
        if self._open is None or not torch.is_grad_enabled() or logits.shape[0] == 0:
            return x  # (an empty microbatch keeps ep replicas in step; it has no tokens to route)
        total, aux_coef, z_coef = self._open
        share = logits.shape[0] / total / len(self.layers)
        aux = load_balancing_loss(probs, counts)
        z = z_loss(logits) if z_coef else logits.new_zeros(())
        if record:
            row = self._stats[self._row[layer]]
            row[:self.num_experts] += counts.to(row)
            row[-2] += share * float(aux.detach())
            row[-1] += share * float(z.detach())
        # every tp rank routes the same tokens and adds the same loss: each adds 1/tp of it, and
        # the tp sums of the router's (partial) gradient and of the input's gradient make it whole
        loss = (aux_coef * aux + z_coef * z) * (share / tp_size)
        return _AttachLoss.apply(x, loss)

    def metrics(self, layout) -> dict:
        """Router statistics of the last step over the whole layout (collective): the added losses
        (unscaled by their coefficients) and, per sparse layer, the max and mean tokens per expert."""
        stats = self._stats
        if stats is None:
            return {}
        # every tp rank saw the same tokens: count tp rank 0's
        stats = mappings.all_reduce(stats * (1.0 if layout.tp_rank == 0 else 0.0), layout.group)
        out = {"router/aux_loss": float(stats[:, -2].sum()), "router/z_loss": float(stats[:, -1].sum())}
        ratios = []
        for layer, row in zip(self.layers, stats):
            counts = row[:self.num_experts]
            mx, mean = float(counts.max()), float(counts.mean())
            out[f"router/layer{layer}/tokens_max"] = mx
            out[f"router/layer{layer}/tokens_mean"] = mean
            ratios.append(mx / mean if mean > 0 else 0.0)
        out["router/max_over_mean"] = max(ratios) if ratios else 0.0
        return out


class Expert(nn.Module):
    """One SwiGLU expert; its three weights under the checkpoint's names."""

    def __init__(self, names, hidden: int, inter: int, layout, *, dtype, device):
        super().__init__()
        self.names = names
        kw = dict(dtype=dtype, device=device)
        for name, lin in zip(names, (ColumnParallelLinear(hidden, inter, layout, **kw),
                                     ColumnParallelLinear(hidden, inter, layout, **kw),
                                     RowParallelLinear(inter, hidden, layout, **kw))):
            self.add_module(name, lin)
            lin.weight.expert_parallel = True

    @property
    def weights(self):
        """(gate [F/tp, H], up [F/tp, H], down [H, F/tp])."""
        return tuple(getattr(self, n).weight for n in self.names)

    def forward(self, x):
        """This rank's part of the expert's output (a partial sum over tp)."""
        g, u, d = self.weights
        return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


def grouped_experts(x: torch.Tensor, counts: list[int], experts: list[Expert]) -> torch.Tensor:
    """Every expert on its rows of ``x`` (rows grouped by expert, ``counts`` each) in three grouped
    GEMMs (``torch._grouped_mm``): one kernel per matmul on CUDA instead of one per expert."""
    offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    g, u, d = (torch.stack(ws) for ws in zip(*(e.weights for e in experts)))
    h = F.silu(torch._grouped_mm(x, g.transpose(-2, -1), offs=offs)) * \
        torch._grouped_mm(x, u.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(h, d.transpose(-2, -1), offs=offs)


def looped_experts(x: torch.Tensor, counts: list[int], experts: list[Expert]) -> torch.Tensor:
    """The same, one expert at a time (every expert runs, also on zero rows, so each weight gets a
    gradient and the data-parallel buffers see every parameter)."""
    return torch.cat([e(part) for e, part in zip(experts, x.split(counts))])


def _grouped_ok(x: torch.Tensor, experts) -> bool:
    # torch's grouped GEMM wants 16-byte aligned strides; on CPU the loop is as fast
    if not (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16):
        return False
    g, _, d = experts[0].weights
    return all(n % 8 == 0 for n in (*g.shape, *d.shape))


class SparseMoE(nn.Module):
    """The sparse MLP of one layer: router + this rank's experts."""

    def __init__(self, cfg, layout, layer_idx: int, losses: RouterLosses | None, *, sp, dtype,
                 device):
        super().__init__()
        E, ep = cfg.num_experts, layout.ep_size
        self.layer_idx, self.num_experts, self.k = layer_idx, E, cfg.num_experts_per_tok
        self.normalise = cfg.norm_topk_prob
        self.sequence_parallel = sp
        self.tp_group, self.tp_size = layout.tp_group, layout.tp_size
        self.ep_group, self.ep_size = layout.ep_group, ep
        self.losses = losses
        # the router's gradient is a partial sum over tp: its weights scale partial expert outputs
        self.gate = nn.Module()
        self.gate.weight = replicated_param((E, cfg.hidden_size), dtype=dtype, device=device,
                                            partial=True)
        per_rank = E // ep
        self.first_expert = layout.ep_rank * per_rank
        names = EXPERT_NAMES[cfg.model_type][1]
        self.experts = nn.ModuleDict({
            str(j): Expert(names, cfg.hidden_size, cfg.expert_intermediate_size, layout, dtype=dtype,
                           device=device)
            for j in range(self.first_expert, self.first_expert + per_rank)})
        self.grouped = None  # None: grouped GEMMs where they apply; True/False forces a path

    @property
    def local_experts(self) -> list[Expert]:
        return list(self.experts.values())

    def router(self, x):
        """fp32 logits [N, E]."""
        return F.linear(x.float(), self.gate.weight.float())

    def forward(self, x, *, static: bool = False):
        """x [N, H] (sequence-sharded under SP) -> [N, H] in the same sharding.

        ``static=True`` keeps every shape fixed and the host out of the loop (a captured decode
        step): each local expert runs on every token (weight 0 where not routed) and, under ep,
        tokens are all-gathered over the ep group and the outputs reduce-scattered back. Same
        result, more FLOPs; no gradient."""
        if self.sequence_parallel:
            x = mappings.gather_from_sequence(x, self.tp_group)
        else:
            x = mappings.copy_to_tp(x, self.tp_group)
        logits = self.router(x)
        probs, idx, w = route(logits, self.k, self.normalise)
        counts = torch.bincount(idx.reshape(-1), minlength=self.num_experts)
        if self.losses is not None:
            x = self.losses.attach(x, self.layer_idx, logits, probs, counts, tp_size=self.tp_size,
                                   record=torch._C._current_graph_task_id() == -1)
        y = self._static(x, idx, w) if static else self._sparse(x, idx, w, counts)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence(y, self.tp_group)
        return mappings.reduce_from_tp(y, self.tp_group)

    # ---- the sparse path: sort by expert, exchange, run, exchange back, weight and sum ----------
    def _sparse(self, x, idx, w, counts):
        (N, k), H = idx.shape, x.shape[-1]
        order = torch.argsort(idx.reshape(-1), stable=True)  # (token, slot) pairs by expert
        # each token's row k times, then a permutation: both have deterministic backwards (a sum
        # over k, a scatter to distinct rows), unlike a gather with repeated indices
        rows = x.unsqueeze(1).expand(N, k, H).reshape(N * k, H)[order]
        out = self._run_experts(rows, counts)
        out = out[torch.argsort(order)].view(N, k, H)
        return (out.float() * w.unsqueeze(-1)).sum(1).to(x.dtype)

    def _run_experts(self, rows, counts):
        """Rows grouped by global expert (``counts`` each) -> the experts' outputs, same order."""
        per_rank = len(self.experts)
        if self.ep_size == 1:
            return self._compute(rows, counts.tolist())
        # how many rows each rank sends us for each of our experts
        split = [per_rank] * self.ep_size
        got = mappings.all_to_all_rows(counts, split, split, self.ep_group).view(self.ep_size, per_rank)
        in_rows = counts.view(self.ep_size, per_rank).sum(1).tolist()
        out_rows = got.sum(1).tolist()
        recv = mappings.all_to_all(rows, out_rows, in_rows, self.ep_group)  # (source, expert) order
        # regroup the received rows by expert (source order within an expert), run, put back
        starts = (got.reshape(-1).cumsum(0) - got.reshape(-1)).view(self.ep_size, per_rank).tolist()
        got_l = got.tolist()
        perm = torch.cat([torch.arange(starts[src][e], starts[src][e] + got_l[src][e])
                          for e in range(per_rank) for src in range(self.ep_size)]).to(rows.device)
        local_counts = got.sum(0).tolist()
        out = self._compute(recv[perm], local_counts)[torch.argsort(perm)]
        return mappings.all_to_all(out, in_rows, out_rows, self.ep_group)

    def _compute(self, rows, counts: list[int]):
        experts = self.local_experts
        grouped = _grouped_ok(rows, experts) if self.grouped is None else self.grouped
        return (grouped_experts if grouped else looped_experts)(rows, counts, experts)

    # ---- the static path (captured decode steps) ------------------------------------------------
    @torch.no_grad()
    def _static(self, x, idx, w):
        if self.ep_size > 1:
            x = mappings.all_gather_dim(x, 0, self.ep_group)
            idx = mappings.all_gather_dim(idx, 0, self.ep_group)
            w = mappings.all_gather_dim(w, 0, self.ep_group)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for j, expert in enumerate(self.local_experts, start=self.first_expert):
            weight = (w * (idx == j)).sum(-1, keepdim=True)
            y += weight * expert(x).float()
        if self.ep_size > 1:
            y = mappings.reduce_scatter_dim(y, 0, self.ep_group)
        return y.to(x.dtype)


def check_experts_fit(cfg, layout, name: str):
    """An ep that does not divide the experts is one line naming the model and the sizes."""
    from .config import ConfigError
    if layout.ep_size > 1 and not cfg.is_moe:
        raise ConfigError(f"{name}: ep={layout.ep_size} but the model has no experts: use ep=1")
    if cfg.is_moe and cfg.num_experts % layout.ep_size:
        raise ConfigError(f"{name}: ep={layout.ep_size} does not divide num_experts="
                          f"{cfg.num_experts}: choose an ep that divides it")
    if cfg.is_moe and cfg.expert_intermediate_size % layout.tp_size:
        raise ConfigError(f"{name}: the experts' intermediate size {cfg.expert_intermediate_size} "
                          f"is not divisible by tp={layout.tp_size}: choose a tp that divides it")
