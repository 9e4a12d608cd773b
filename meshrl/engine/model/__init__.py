"""Llama-family models under a parallel layout, and their Hugging Face interop."""
from __future__ import annotations

import torch

from meshrl.parallel.layout import ParallelLayout
from meshrl.parallel.random import init_shard_

from .attention import PackedMeta
from .config import ConfigError, ModelConfig, config_from_hf_dict, load_config
from .hf import load_hf_weights, save_hf
from .llama import LlamaStage, stage_layers
from .meta import meta_specs

__all__ = ["ConfigError", "ModelConfig", "LlamaStage", "PackedMeta", "build_stage", "config_from_hf_dict",
           "init_weights_", "load_config", "load_hf_weights", "meta_specs", "save_hf", "stage_layers"]


@torch.no_grad()
def init_weights_(stage: LlamaStage, seed: int, std: float = 0.02) -> None:
    """From-scratch init, identical full weights in every layout for one seed: norms 1, biases 0,
    matrices N(0, std²), a value head 0 (a critic starts by predicting 0)."""
    for p in stage.parameters():
        spec = p.shard_spec
        if spec.name.endswith("norm.weight"):
            p.fill_(1.0)
        elif spec.name.endswith(".bias") or spec.name == "score.weight":
            p.zero_()
        else:
            init_shard_(p, spec, seed, std)


def build_stage(layout: ParallelLayout, *, model_dir: str | None = None,
                config: ModelConfig | None = None, head: str = "lm", dtype=torch.float32,
                device=None, seed: int = 0, sequence_parallel: bool = False,
                activation_checkpointing: bool = False, init_std: float = 0.02) -> LlamaStage:
    """This rank's stage of a model: loaded from ``model_dir`` or freshly initialised from ``seed``
    (matrices N(0, init_std²))."""
    if config is None:
        if model_dir is None:
            raise ConfigError("build_stage needs model_dir or config")
        config = load_config(model_dir)
    stage = LlamaStage(config, layout, head=head, sequence_parallel=sequence_parallel,
                       activation_checkpointing=activation_checkpointing, dtype=dtype, device=device)
    if model_dir is not None:
        stage.load_report = load_hf_weights(stage, model_dir, seed=seed)
    else:
        init_weights_(stage, seed, init_std)
    return stage
