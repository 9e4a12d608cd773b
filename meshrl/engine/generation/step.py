"""One decoding step of one pipeline stage, written for capture: a static KV cache, weights fused at
generation setup, and per-layer pieces that take only tensors and constants. The prefill runs the
same pieces over the packed prompts (``prefill_layers``).

The pieces follow ``model/llama.py`` operation for operation (RMSNorm in fp32 then the weight in the
model dtype, rotary embeddings, ``x + (y + bias)`` residuals with row-parallel biases added after the
tp reduction), so on CPU the step agrees with the stage's own forward to fp32 rounding. They are cut
at the tp all-reduces, which stay outside ``torch.compile`` (a captured NCCL call is fine; a traced
one would be a graph break), and at attention, which is its own kernel.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meshrl.kernels.decode_attention import attend, auto_splits, uses_triton
from meshrl.parallel import mappings

from ..model.attention import apply_rope, rope_cos_sin, varlen_causal_attention
from ..model.moe import SparseMoE
from .shard_sampling import record_step


class StaticKVCache:
    """Per layer K and V of B sequences, [B, kv_heads, capacity, head_dim], allocated once. The
    prefill pass goes through the stage's own forward (``attend`` below); decode steps write and
    read the cache through ``kernels.decode_attention``."""

    def __init__(self, stage, batch: int, capacity: int, *, dtype, device):
        self.k, self.v = {}, {}
        for idx, layer in stage.model.layers.items():
            attn = layer.self_attn
            shape = (batch, attn.n_kv, capacity, attn.head_dim)
            self.k[int(idx)] = torch.zeros(shape, dtype=dtype, device=device)
            self.v[int(idx)] = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.prefill_rows = None  # [N] row of each packed prompt token, set before the prefill

    def attend(self, layer_idx, q, k, v, meta, *, window=None):
        self.k[layer_idx][self.prefill_rows, :, meta.position_ids] = k
        self.v[layer_idx][self.prefill_rows, :, meta.position_ids] = v
        return varlen_causal_attention(q, k, v, meta, window=window)

    def copy_prefix(self, sources, targets, length: int):
        """Every layer's first ``length`` positions of slots ``sources`` (index tensor) copied into
        slots ``targets``: samples of one prompt share its prefill."""
        for cache in (*self.k.values(), *self.v.values()):
            cache[targets, :, :length] = cache[sources, :, :length]

    def rows(self, r: slice):
        """Per layer (K, V) views of some rows, in layer order."""
        return [(self.k[i][r], self.v[i][r]) for i in sorted(self.k)]


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    ln2: torch.Tensor
    q_norm: torch.Tensor | None  # per-head RMSNorm weights (Qwen3), else None
    k_norm: torch.Tensor | None
    # a dense MLP's weights (None for a sparse layer)
    gate: torch.Tensor | None = None  # gate and up rows stacked when fused, else the gate alone
    gate_bias: torch.Tensor | None = None
    up: torch.Tensor | None = None  # None when fused into ``gate``
    up_bias: torch.Tensor | None = None
    down: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    moe: object = None  # a sparse layer's SparseMoE (its weights read in place)


def _d(p):
    return None if p is None else p.detach()


def _cat_into(buf, parts):
    if parts[0] is None:
        return None
    return torch.cat([p.detach() for p in parts], 0, out=buf)


class DecodeWeights:
    """The stage's weights as the decode step reads them: Q/K/V (and gate/up) rows concatenated into
    buffers allocated once and refreshed from the parameters on every ``refresh`` (so training
    updates are seen), everything else read in place. ``fingerprint`` changes when a parameter's
    storage moves (e.g. after a reallocation), which invalidates captured graphs."""

    def __init__(self, stage, *, fuse_mlp: bool = True):
        self.stage, self.fuse_mlp = stage, fuse_mlp
        self._bufs: dict = {}
        self.layers: list[LayerWeights] = []

    def fingerprint(self):
        return tuple(p.data_ptr() for p in self.stage.parameters())

    def _fused(self, key, parts):
        if parts[0] is None:
            return None
        if key not in self._bufs:
            rows = sum(p.shape[0] for p in parts)
            self._bufs[key] = torch.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype,
                                          device=parts[0].device)
        return _cat_into(self._bufs[key], parts)

    @torch.no_grad()
    def refresh(self):
        self.layers = []
        for idx, layer in self.stage.model.layers.items():
            a, m = layer.self_attn, layer.feed_forward
            qkv = self._fused((idx, "qkv"), [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            qkv_b = self._fused((idx, "qkv_b"), [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            attention = dict(
                ln1=_d(layer.input_layernorm.weight), qkv=qkv, qkv_bias=qkv_b,
                o=_d(a.o_proj.weight), o_bias=_d(a.o_proj.bias),
                ln2=_d(layer.post_attention_layernorm.weight),
                q_norm=None if a.q_norm is None else _d(a.q_norm.weight),
                k_norm=None if a.k_norm is None else _d(a.k_norm.weight))
            if isinstance(m, SparseMoE):
                self.layers.append(LayerWeights(**attention, moe=m))
                continue
            if self.fuse_mlp:
                gate = self._fused((idx, "gu"), [m.gate_proj.weight, m.up_proj.weight])
                gate_b = self._fused((idx, "gu_b"), [m.gate_proj.bias, m.up_proj.bias])
                up = up_b = None
            else:
                gate, gate_b = _d(m.gate_proj.weight), _d(m.gate_proj.bias)
                up, up_b = _d(m.up_proj.weight), _d(m.up_proj.bias)
            self.layers.append(LayerWeights(
                **attention, gate=gate, gate_bias=gate_b, up=up, up_bias=up_b,
                down=_d(m.down_proj.weight), down_bias=_d(m.down_proj.bias)))

    def release(self):
        self._bufs.clear()
        self.layers = []


def rms_norm(x, weight, eps: float):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _residual(x, delta, bias):
    if delta is None:
        return x
    return x + (delta if bias is None else delta + bias)


def pre_attention(x, delta, delta_bias, ln_w, eps: float, qkv_w, qkv_b, cos, sin,
                  n_heads: int, n_kv: int, head_dim: int, rotate: bool = True, q_norm=None,
                  k_norm=None):
    """Previous MLP's residual, norm, fused QKV, per-head q/k norms (when given), rotary (unless
    the attention kernel rotates, ``rotate=False``) -> (x, q, k, v)."""
    x = _residual(x, delta, delta_bias)
    qkv = F.linear(rms_norm(x, ln_w, eps), qkv_w, qkv_b)
    nq, nk = n_heads * head_dim, n_kv * head_dim
    q = qkv[:, :nq].view(-1, n_heads, head_dim)
    k = qkv[:, nq:nq + nk].view(-1, n_kv, head_dim)
    v = qkv[:, nq + nk:].view(-1, n_kv, head_dim)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    if not rotate:
        return x, q, k, v
    return x, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def post_attention(x, attn, attn_bias, ln_w, eps: float, gate_w, gate_b, up_w, up_b, down_w):
    """Attention residual, norm, gate/up, SiLU product, down projection (before its tp reduction)
    -> (x, partial MLP output)."""
    x = _residual(x, attn, attn_bias)
    h = rms_norm(x, ln_w, eps)
    if up_w is None:
        g, u = F.linear(h, gate_w, gate_b).chunk(2, dim=-1)
    else:
        g, u = F.linear(h, gate_w, gate_b), F.linear(h, up_w, up_b)
    return x, F.linear(F.silu(g) * u, down_w)


def post_attention_norm(x, attn, attn_bias, ln_w, eps: float):
    """Attention residual and norm -> (x, the MLP's input): a sparse layer's routed experts take
    it from there (``SparseMoE``, its own collectives)."""
    x = _residual(x, attn, attn_bias)
    return x, rms_norm(x, ln_w, eps)


def finish_stage(x, delta, delta_bias, norm_w, eps: float):
    x = _residual(x, delta, delta_bias)
    return x if norm_w is None else rms_norm(x, norm_w, eps)


@dataclass
class StepFns:
    """The pieces a step calls: plain functions, or ``torch.compile``d ones on CUDA (where each
    small eager kernel would cost a launch inside the captured step)."""

    pre: object = pre_attention
    post: object = post_attention
    final: object = finish_stage
    rope: object = rope_cos_sin  # the step's rotary tables, once for all layers
    record: object = record_step
    post_norm: object = post_attention_norm

    @staticmethod
    def compiled(mode: str | None = None, *, prefill: bool = False):
        """The decode step's pieces compile for its fixed shapes. The prefill's row count changes
        from batch to batch: its pieces compile with automatic dynamic shapes (a second row count
        recompiles them once with that dimension symbolic, the weights' stay static), and are
        copies with code objects of their own, because torch.compile caches, and counts
        recompilations against its limit, per code object."""
        kw = dict(dynamic=None if prefill else False, fullgraph=True, mode=mode)
        fns = (pre_attention, post_attention, finish_stage, rope_cos_sin, record_step,
               post_attention_norm)
        return StepFns(*(torch.compile(_own_code(f, "prefill_") if prefill else f, **kw)
                         for f in fns))


def _own_code(fn, prefix: str):
    """``fn`` with a code object of its own (renamed), same globals, defaults and closure."""
    code = fn.__code__.replace(co_name=prefix + fn.__code__.co_name)
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def run_layers(stage, weights: DecodeWeights, fns: StepFns, x, pos, attention, *, rotate: bool,
               static: bool):
    """This stage's layers (and final norm on the last stage) for the rows of x [N, H] at
    positions pos [N]. ``attention(j, attn_module, q, k, v, rope)`` attends for the stage's j-th
    layer; with ``rotate=False`` q and k come unrotated and ``rope`` is the step's (cos, sin).
    ``static``: sparse layers keep every shape fixed (a captured decode step; SparseMoE.forward)."""
    cfg, group = stage.cfg, stage.layout.tp_group
    cos, sin = fns.rope(stage.inv_freq, pos, x.dtype)
    rope = None if rotate else (cos, sin)
    delta = delta_bias = None
    for j, (lw, layer) in enumerate(zip(weights.layers, stage.model.layers.values())):
        a = layer.self_attn
        x, q, k, v = fns.pre(x, delta, delta_bias, lw.ln1, cfg.rms_norm_eps, lw.qkv, lw.qkv_bias,
                             cos, sin, a.n_heads, a.n_kv, a.head_dim, rotate, lw.q_norm, lw.k_norm)
        o = attention(j, a, q, k, v, rope)
        out = mappings.all_reduce(F.linear(o.reshape(o.shape[0], -1), lw.o), group)
        if lw.moe is not None:
            x, h = fns.post_norm(x, out, lw.o_bias, lw.ln2, cfg.rms_norm_eps)
            delta, delta_bias = lw.moe(h, static=static), None  # reduced over tp inside
            continue
        x, delta = fns.post(x, out, lw.o_bias, lw.ln2, cfg.rms_norm_eps, lw.gate, lw.gate_bias, lw.up,
                            lw.up_bias, lw.down)
        delta, delta_bias = mappings.all_reduce(delta, group), lw.down_bias
    norm = stage.model.norm
    return fns.final(x, delta, delta_bias, None if norm is None else norm.weight.detach(),
                     cfg.rms_norm_eps)


def decode_layers(stage, weights: DecodeWeights, fns: StepFns, x, pos, caches, *, attention=None,
                  launch=None, static: bool = True):
    """One new token per row: x [b, H]; pos [b] the tokens' positions; caches per layer (K, V)
    views of the same rows. The Triton attention rotates q and k itself; ``launch`` holds its
    Triton settings as ``attention.attend`` takes them (splits, block_n, num_warps). ``static``:
    sparse layers with fixed shapes (a captured step), else each row to its own experts."""
    backend = "triton" if uses_triton(x, attention) else "torch"  # chosen once for all layers
    launch = dict(launch or {})
    if backend == "triton" and launch.get("splits") is None:
        launch["splits"] = auto_splits(caches[0][0])

    def attend_cached(j, a, q, k, v, rope):
        kc, vc = caches[j]
        return attend(q, k, v, kc, vc, pos, window=a.window, backend=backend, rope=rope, **launch)
    return run_layers(stage, weights, fns, x, pos, attend_cached, rotate=backend == "torch",
                      static=static)


def prefill_layers(stage, weights: DecodeWeights, fns: StepFns, x, meta, cache: StaticKVCache):
    """Packed prompts x [N, H] through the same pieces as a decode step (fused weights, compiled
    on GPU), their keys and values written to the static cache."""
    def attend_packed(j, a, q, k, v, rope):
        return cache.attend(a.layer_idx, q, k, v, meta, window=a.window)
    return run_layers(stage, weights, fns, x, meta.position_ids, attend_packed, rotate=True,
                      static=False)
