"""Tiny randomly initialised Hugging Face models, saved locally (nothing is downloaded)."""
from __future__ import annotations

import os

import torch

# initializer_range 0.2 instead of transformers' 0.02: at 0.02 a model this narrow attends almost
# uniformly (mean KL from uniform 3e-4 nats over 40 tokens, measured), so a wrong rope or mask
# barely moves the logits; at 0.2 that KL is 1.5 nats and parity tests can see such bugs.
TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2, initializer_range=0.2)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny_config(kind: str, **overrides):
    import transformers
    kw = dict(TINY, **overrides)
    if kind == "llama":
        kw.setdefault("rope_scaling", LLAMA3_ROPE)
        return transformers.LlamaConfig(**kw)
    if kind == "mistral":
        kw.setdefault("sliding_window", 16)
        return transformers.MistralConfig(**kw)
    if kind == "qwen2":
        kw.setdefault("tie_word_embeddings", True)
        return transformers.Qwen2Config(**kw)
    if kind == "qwen3":  # q/k norms; head_dim 24, not hidden / heads = 16
        kw.setdefault("head_dim", 24)
        return transformers.Qwen3Config(**kw)
    if kind == "llama3.2":  # tied embeddings and llama3 rope scaling
        kw.setdefault("rope_scaling", LLAMA3_ROPE)
        kw.setdefault("tie_word_embeddings", True)
        return transformers.LlamaConfig(**kw)
    if kind == "qwen3_moe":  # 8 experts, top-3 unnormalised, layer 2 kept dense
        for key, value in dict(head_dim=24, num_experts=8, num_experts_per_tok=3,
                               moe_intermediate_size=32, norm_topk_prob=False,
                               mlp_only_layers=[2]).items():
            kw.setdefault(key, value)
        return transformers.Qwen3MoeConfig(**kw)
    if kind == "mixtral":  # 4 experts, top-2 (renormalised)
        kw.setdefault("num_local_experts", 4)
        kw.setdefault("num_experts_per_tok", 2)
        kw["intermediate_size"] = overrides.get("intermediate_size", 32)
        return transformers.MixtralConfig(**kw)
    raise ValueError(f"unknown tiny model kind {kind}")


def make_tiny_hf(kind: str, out_dir: str, *, seed: int = 0, head: str = "lm", **overrides) -> str:
    """Save a random tiny model of ``kind`` (llama with llama3 rope scaling, llama3.2 the same with
    tied embeddings, mistral with a sliding window, qwen2 with qkv bias and tied embeddings, qwen3
    with q/k norms and a head_dim of its own, qwen3_moe with 8 experts (top-3, one dense layer),
    mixtral with 4 experts (top-2)) to ``out_dir``; return the path."""
    import transformers
    torch.manual_seed(seed)
    cfg = tiny_config(kind, **overrides)
    if head == "lm":
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    else:
        cfg.num_labels = 1
        model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():  # break the symmetry of default inits (norm weights at 1, biases at 0)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir
