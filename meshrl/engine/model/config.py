"""Model configuration for the Llama family, read from a Hugging Face ``config.json``.

Rope settings are accepted from either transformers 4's ``rope_theta`` + ``rope_scaling`` or
transformers 5's ``rope_parameters``."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

# architecture prefix -> model_type; qkv bias is read from the config (Qwen2 always has it);
# Qwen3 normalises each query and key head (RMSNorm over head_dim) before the rotary embedding;
# Qwen3-MoE and Mixtral replace the MLP by routed experts (engine/model/moe.py)
ARCHITECTURES = {"Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2", "Qwen3": "qwen3",
                 "Qwen3Moe": "qwen3_moe", "Mixtral": "mixtral"}
MOE_TYPES = ("qwen3_moe", "mixtral")
HEAD_SUFFIXES = ("ForCausalLM", "ForSequenceClassification")


class ConfigError(ValueError):
    """A model config meshrl cannot use; the message names the field and the fix."""


@dataclass(kw_only=True)
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    qk_norm: bool = False  # RMSNorm on each query and key head before rotary (Qwen3)
    # mixture of experts (0 experts: every layer has a dense MLP)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None  # each expert's; None: intermediate_size (Mixtral)
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    decoder_sparse_step: int = 1  # every n-th layer is sparse (Qwen3-MoE)
    mlp_only_layers: tuple = ()  # layers kept dense (Qwen3-MoE)
    router_aux_loss_coef: float = 0.001  # the checkpoint's load-balancing coefficient
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # the rest of config.json, written back on save

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"hidden_size={self.hidden_size} is not a multiple of "
                                  f"num_attention_heads={self.num_attention_heads}: set head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        self.mlp_only_layers = tuple(int(i) for i in self.mlp_only_layers)
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} with "
                              f"num_experts={self.num_experts}: route each token to 1..num_experts")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def is_moe_layer(self, i: int) -> bool:
        """Layer ``i`` routes its tokens to experts (transformers' rule for Qwen3-MoE)."""
        return (self.is_moe and i not in self.mlp_only_layers
                and (i + 1) % max(1, self.decoder_sparse_step) == 0)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def num_params(self, *, value_head: bool = False, active: bool = False) -> int:
        """Parameters of the whole model; ``active=True`` counts only the experts one token runs
        through (num_experts_per_tok of each MoE layer's num_experts), the FLOPs' measure."""
        h, f, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 2 * h
        per_layer += (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        per_layer += 2 * self.head_dim * self.qk_norm
        dense_mlp = 3 * h * f + (2 * f + h) * self.mlp_bias
        n_moe = len(self.moe_layers)
        experts = self.num_experts_per_tok if active else self.num_experts
        moe_mlp = h * self.num_experts + experts * 3 * h * self.expert_intermediate_size
        head = h if value_head else (0 if self.tie_word_embeddings else self.vocab_size * h)
        return (self.vocab_size * h + L * per_layer + (L - n_moe) * dense_mlp + n_moe * moe_mlp
                + h + head)

    def to_hf_dict(self, architecture: str) -> dict:
        d = dict(self.extra)
        d.update(architectures=[architecture], model_type=self.model_type,
                 vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads,
                 num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                 rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
                 tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
                 eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                 hidden_act="silu")
        rope = {"rope_theta": self.rope_theta, **(self.rope_scaling or {"rope_type": "default"})}
        d["rope_parameters"] = rope
        d.pop("rope_scaling", None)
        d["rope_theta"] = self.rope_theta  # transformers 4 readers look here
        if self.model_type == "llama":
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "qwen3":
            d["attention_bias"] = self.qkv_bias
        if self.model_type in ("mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"):
            d["sliding_window"] = self.sliding_window
        if self.model_type == "qwen3_moe":
            d.update(attention_bias=self.qkv_bias, num_experts=self.num_experts,
                     moe_intermediate_size=self.expert_intermediate_size,
                     norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=self.decoder_sparse_step,
                     mlp_only_layers=list(self.mlp_only_layers))
        if self.model_type == "mixtral":
            d["num_local_experts"] = self.num_experts
        if self.is_moe:
            d.update(num_experts_per_tok=self.num_experts_per_tok,
                     router_aux_loss_coef=self.router_aux_loss_coef)
        return d


def _require(d: dict, key: str, path: str):
    if key not in d:
        raise ConfigError(f"{path}: missing config key '{key}': add it to config.json")
    return d[key]


def _rope_from_hf(d: dict) -> tuple[float, dict | None]:
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or None
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    src = dict(params) if params else (dict(scaling) if scaling else {})
    src.pop("rope_theta", None)
    kind = src.get("rope_type", src.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind not in ("llama3", "linear"):
        raise ConfigError(f"rope type '{kind}' is not supported (llama3, linear, default): "
                          "use a model with one of those")
    src["rope_type"] = kind
    src.pop("type", None)
    return float(theta), src


def _moe_from_hf(d: dict, model_type: str, path: str) -> dict:
    if model_type not in MOE_TYPES:
        return {}
    # transformers names the expert count num_experts for Qwen3-MoE and num_local_experts for
    # Mixtral (and writes both keys for Qwen3-MoE)
    n = d.get("num_experts", d.get("num_local_experts"))
    if not n:
        raise ConfigError(f"{path}: a {model_type} config needs num_experts (or num_local_experts)")
    return dict(num_experts=int(n), num_experts_per_tok=int(d.get("num_experts_per_tok", 2)),
                moe_intermediate_size=d.get("moe_intermediate_size"),
                # Mixtral always renormalises its top-2 weights; Qwen3-MoE says so in its config
                norm_topk_prob=(True if model_type == "mixtral"
                                else bool(d.get("norm_topk_prob", False))),
                decoder_sparse_step=int(d.get("decoder_sparse_step", 1) or 1),
                mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
                router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)))


def architecture_of(d: dict, path: str = "config.json") -> tuple[str, str]:
    """(model_type, head kind 'ForCausalLM'|'ForSequenceClassification') of a HF config dict."""
    archs = d.get("architectures") or []
    for arch in archs:
        for prefix, mtype in ARCHITECTURES.items():
            for suffix in HEAD_SUFFIXES:
                if arch == prefix + suffix:
                    return mtype, suffix
    mtype = d.get("model_type")
    if not archs and mtype in ARCHITECTURES.values():
        return mtype, "ForCausalLM"
    known = ", ".join(p + s for p in ARCHITECTURES for s in HEAD_SUFFIXES)
    raise ConfigError(f"{path}: unknown architecture {archs or mtype}: meshrl supports {known}")


def config_from_hf_dict(d: dict, path: str = "config.json") -> ModelConfig:
    model_type, _ = architecture_of(d, path)
    theta, scaling = _rope_from_hf(d)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")
    vals = {k: int(_require(d, k, path)) for k in keys}
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{path}: hidden_act='{act}' is not supported: meshrl implements SwiGLU (silu)")
    qkv_bias = bool(d.get("attention_bias", False)) or model_type == "qwen2"
    window = (d.get("sliding_window")
              if d.get("use_sliding_window", model_type in ("mistral", "mixtral")) else None)
    known = set(keys) | {"num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                         "rope_scaling", "rope_parameters", "max_position_embeddings",
                         "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id",
                         "eos_token_id", "pad_token_id", "architectures", "model_type",
                         "num_experts", "num_local_experts", "num_experts_per_tok",
                         "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                         "mlp_only_layers", "router_aux_loss_coef"}
    return ModelConfig(
        model_type=model_type, **vals,
        num_key_value_heads=int(d.get("num_key_value_heads") or vals["num_attention_heads"]),
        head_dim=d.get("head_dim"), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
        o_bias=bool(d.get("attention_bias", False)) and model_type == "llama",
        mlp_bias=bool(d.get("mlp_bias", False)), sliding_window=window,
        qk_norm=model_type in ("qwen3", "qwen3_moe"), **_moe_from_hf(d, model_type, path),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
        extra={k: v for k, v in d.items() if k not in known})


def load_config(model_dir: str) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{model_dir}: no config.json: point --model at a Hugging Face model directory")
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e}): fix or regenerate the file") from None
    return config_from_hf_dict(d, path)


def replace(cfg: ModelConfig, **kw) -> ModelConfig:
    return dataclasses.replace(cfg, **kw)
