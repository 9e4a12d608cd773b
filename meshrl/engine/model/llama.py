"""The Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3) as one pipeline stage of
a layout.

Parameter names follow Hugging Face's (``model.layers.3.self_attn.q_proj.weight``), so checkpoint
interop is a lookup; each parameter's ShardSpec says which slice this rank holds.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from meshrl.parallel import mappings
from meshrl.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                    VocabParallelOutput, grad_of, name_shard_specs, replicated_param,
                                    sync_tp_partial_grads)
from meshrl.parallel.layout import ParallelLayout
from meshrl.parallel.sharding import ShardSpec, replicated_head_range

from .attention import PackedMeta, apply_rope, rope_cos_sin, rope_inv_freq, varlen_causal_attention
from .config import ConfigError, ModelConfig
from .moe import RouterLosses, SparseMoE, block_name, check_experts_fit

HEADS = ("lm", "value")


class RMSNorm(nn.Module):
    def __init__(self, hidden, eps, *, partial_grad=False, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = replicated_param((hidden,), dtype=dtype, device=device, partial=partial_grad)

    def forward(self, x):
        # fp32 statistics, then back to the input dtype before the weight: the reference's order
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: ParallelLayout, layer_idx: int, *, sp, dtype, device):
        super().__init__()
        tp, r = layout.tp_size, layout.tp_rank
        hd = cfg.head_dim
        self.layer_idx = layer_idx
        self.window = cfg.sliding_window
        self.n_heads = cfg.num_attention_heads // tp
        kv_range = replicated_head_range(cfg.num_key_value_heads, hd, tp, r)
        self.n_kv = (kv_range[1] - kv_range[0]) // hd
        self.head_dim = hd
        kw = dict(sequence_parallel=sp, dtype=dtype, device=device)
        q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, q_out, layout, bias=cfg.qkv_bias, **kw)
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, kv_out, layout, bias=cfg.qkv_bias,
                                           out_range=kv_range, **kw)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, kv_out, layout, bias=cfg.qkv_bias,
                                           out_range=kv_range, **kw)
        self.o_proj = RowParallelLinear(q_out, cfg.hidden_size, layout, bias=cfg.o_bias, **kw)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            # one weight for all heads, each tp rank holding some heads: its gradient is a partial
            # sum over tp (also for K/V heads replicated across ranks: each copy serves other
            # query heads)
            norm = dict(partial_grad=True, dtype=dtype, device=device)
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, **norm)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, **norm)

    def forward(self, x, cos, sin, meta: PackedMeta, cache=None):
        x = self.q_proj.enter(x)  # one input collective for q, k and v
        q = self.q_proj(x, entered=True).view(-1, self.n_heads, self.head_dim)
        k = self.k_proj(x, entered=True).view(-1, self.n_kv, self.head_dim)
        v = self.v_proj(x, entered=True).view(-1, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            o = cache.attend(self.layer_idx, q, k, v, meta, window=self.window)
        else:
            o = varlen_causal_attention(q, k, v, meta, window=self.window)
        return self.o_proj(o.reshape(o.shape[0], self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: ParallelLayout, *, sp, dtype, device):
        super().__init__()
        kw = dict(bias=cfg.mlp_bias, sequence_parallel=sp, dtype=dtype, device=device)
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = ColumnParallelLinear(h, f, layout, **kw)
        self.up_proj = ColumnParallelLinear(h, f, layout, **kw)
        self.down_proj = RowParallelLinear(f, h, layout, **kw)

    def forward(self, x):
        x = self.gate_proj.enter(x)  # one input collective for gate and up
        return self.down_proj(F.silu(self.gate_proj(x, entered=True)) * self.up_proj(x, entered=True))


class DecoderLayer(nn.Module):
    """Attention and an MLP, each after a norm and around a residual. The MLP is dense, or routed
    experts (``SparseMoE``) under the checkpoint's name for it (``mlp`` or ``block_sparse_moe``)."""

    def __init__(self, cfg, layout, layer_idx, *, sp, dtype, device, router_losses=None):
        super().__init__()
        norm = dict(partial_grad=sp, dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.self_attn = Attention(cfg, layout, layer_idx, sp=sp, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        if cfg.is_moe_layer(layer_idx):
            self.mlp_name = block_name(cfg)
            self.add_module(self.mlp_name, SparseMoE(cfg, layout, layer_idx, router_losses, sp=sp,
                                                     dtype=dtype, device=device))
        else:
            self.mlp_name = "mlp"
            self.mlp = MLP(cfg, layout, sp=sp, dtype=dtype, device=device)

    @property
    def feed_forward(self):
        """The MLP, dense or sparse, whatever its checkpoint name."""
        return getattr(self, self.mlp_name)

    def forward(self, x, cos, sin, meta, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, cache)
        return x + self.feed_forward(self.post_attention_layernorm(x))


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Stage s holds layers [⌊s·L/pp⌋, ⌊(s+1)·L/pp⌋)."""
    return range(stage * num_layers // pp, (stage + 1) * num_layers // pp)


def check_layout_fits(cfg: ModelConfig, layout: ParallelLayout, name: str = "model"):
    tp, pp = layout.tp_size, layout.pp_size
    if cfg.num_attention_heads % tp:
        raise ConfigError(f"{name}: num_attention_heads={cfg.num_attention_heads} is not divisible "
                          f"by tp={tp}: choose a tp that divides it")
    kv = cfg.num_key_value_heads
    if kv % tp and tp % kv:
        raise ConfigError(f"{name}: num_key_value_heads={kv} and tp={tp}: one must divide the other")
    dense = any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    if dense and cfg.intermediate_size % tp:
        raise ConfigError(f"{name}: intermediate_size={cfg.intermediate_size} is not divisible by tp={tp}")
    check_experts_fit(cfg, layout, name)
    if cfg.num_hidden_layers < pp:
        raise ConfigError(f"{name}: {cfg.num_hidden_layers} layers cannot fill pp={pp} stages: "
                          "use pp <= num_hidden_layers")


class Decoder(nn.Module):
    """``model.*``: embedding (first stage), this stage's layers, final norm (last stage)."""

    def __init__(self, cfg, layout, *, sp, dtype, device, router_losses=None):
        super().__init__()
        self.embed_tokens = None
        if layout.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, layout,
                                                       sequence_parallel=sp, dtype=dtype, device=device)
        self.layers = nn.ModuleDict({
            str(i): DecoderLayer(cfg, layout, i, sp=sp, dtype=dtype, device=device,
                                 router_losses=router_losses)
            for i in stage_layers(cfg.num_hidden_layers, layout.pp_size, layout.pp_rank)})
        self.norm = None
        if layout.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, partial_grad=sp, dtype=dtype,
                                device=device)


class LlamaStage(nn.Module):
    """One pipeline stage of a causal LM (``head='lm'``) or a critic/reward model (``head='value'``,
    a scalar ``score`` head as in transformers' ``*ForSequenceClassification``).

    ``forward`` maps token ids (first stage) or the previous stage's hidden states (set with
    ``set_input_tensor``) to hidden states; on the last stage they are final-normed, and
    ``logits``/``token_logprobs``/``values`` apply the head.
    """

    def __init__(self, cfg: ModelConfig, layout: ParallelLayout, *, head: str = "lm",
                 sequence_parallel: bool = False, activation_checkpointing: bool = False,
                 dtype=torch.float32, device=None):
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"head='{head}': use one of {HEADS}")
        check_layout_fits(cfg, layout, layout.name)
        self.cfg, self.layout, self.head = cfg, layout, head
        self.sequence_parallel = sequence_parallel and layout.tp_size > 1
        self.activation_checkpointing = activation_checkpointing
        sp = self.sequence_parallel
        # the load-balancing (and z-) losses of this stage's sparse layers, and their statistics
        self.router_losses = RouterLosses(cfg) if cfg.is_moe else None
        self.model = Decoder(cfg, layout, sp=sp, dtype=dtype, device=device,
                             router_losses=self.router_losses)
        self.lm_head = self.score = None
        if layout.is_last_stage and head == "lm":
            if cfg.tie_word_embeddings and layout.pp_size == 1:
                self.lm_head = VocabParallelOutput(cfg.hidden_size, cfg.vocab_size, layout,
                                                   sequence_parallel=sp, dtype=dtype, device="meta")
                self.lm_head.weight = self.model.embed_tokens.weight
            else:
                self.lm_head = VocabParallelOutput(cfg.hidden_size, cfg.vocab_size, layout,
                                                   sequence_parallel=sp, dtype=dtype, device=device)
        elif layout.is_last_stage:
            self.score = nn.Linear(cfg.hidden_size, 1, bias=False, dtype=dtype, device=device)
            self.score.weight.shard_spec = ShardSpec("", (1, cfg.hidden_size))
            self.score.weight.tp_partial_grad = sp
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(device), persistent=False)
        self.specs = name_shard_specs(self)
        if self.tied_head_separate:
            # The last stage's copy of a tied embedding is the same logical tensor.
            spec = dataclasses.replace(self.lm_head.weight.shard_spec, name="model.embed_tokens.weight")
            self.lm_head.weight.shard_spec = spec
            self.specs.pop("lm_head.weight")
            self.specs["model.embed_tokens.weight"] = spec
        self._input_tensor = None

    @property
    def tied_head_separate(self) -> bool:
        return (self.lm_head is not None and self.cfg.tie_word_embeddings
                and self.layout.pp_size > 1)

    # ---- pipeline plumbing ----------------------------------------------------------------------
    def set_input_tensor(self, tensor):
        self._input_tensor = tensor

    def input_hidden(self, input_ids):
        """The first layer's input: the embeddings on the first stage, else what the previous
        stage sent (``set_input_tensor``)."""
        if self.model.embed_tokens is not None:
            return self.model.embed_tokens(input_ids)
        if self._input_tensor is None:
            raise RuntimeError("non-first pipeline stage called without set_input_tensor")
        return self._input_tensor

    def forward(self, input_ids, meta: PackedMeta, cache=None):
        """input_ids [N] (used on the first stage) -> hidden [N, H] (sequence-sharded under SP)."""
        x = self.input_hidden(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, meta.position_ids, x.dtype)
        for layer in self.model.layers.values():
            if self.activation_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint(layer, x, cos, sin, meta, use_reentrant=False)
            else:
                x = layer(x, cos, sin, meta, cache)
        if self.model.norm is not None:
            x = self.model.norm(x)
        return x

    # ---- heads (last stage) ---------------------------------------------------------------------
    def logits(self, hidden):
        """Vocabulary-parallel logits [N, V_padded/tp]; padded columns are −inf."""
        return self.lm_head(hidden)

    def token_logprobs(self, hidden, labels, *, temperature=1.0, return_entropy=False):
        """Log-probs (and entropies) of ``labels`` without materialising full-vocabulary logits."""
        from meshrl.kernels import linear_token_logprobs
        h = self.lm_head.gather_input(hidden)
        return linear_token_logprobs(h, self.lm_head.weight, labels, temperature=temperature,
                                     return_entropy=return_entropy, tp_group=self.layout.tp_group,
                                     vocab_size=self.cfg.vocab_size)

    def values(self, hidden):
        """Scalar value per token [N] (full sequence even under SP)."""
        v = self.score(hidden).squeeze(-1).float()
        if self.sequence_parallel:
            # every rank computes the same loss from the gathered values: keep own piece of the grad
            v = mappings.gather_from_sequence(v, self.layout.tp_group, grad_is_partial=False)
        return v

    # ---- gradients ------------------------------------------------------------------------------
    @torch.no_grad()
    def sync_model_grads(self):
        """Complete gradients the model itself makes partial, before data-parallel reduction:
        tp partial sums (SP norms, replicated K/V heads) and the tied embedding's two copies."""
        sync_tp_partial_grads(self.parameters(), self.layout.tp_group)
        if self.layout.pp_size > 1 and self.cfg.tie_word_embeddings and self.head == "lm":
            w = self.model.embed_tokens.weight if self.layout.is_first_stage else \
                (self.lm_head.weight if self.lm_head is not None else None)
            if w is not None and grad_of(w) is not None:
                mappings.all_reduce(grad_of(w), self.layout.ends_group)

