"""Hugging Face checkpoints in and out, straight into (or out of) any layout.

Loading reads only the slices each rank's ShardSpecs name (safetensors slices are memory-mapped
reads; ``pytorch_model*.bin`` is memory-mapped by ``torch.load(mmap=True)``), so under expert
parallelism a rank reads only its own experts. Saving gathers each stage's shards to its first
tensor-parallel rank, which writes one safetensors file per stage (per stage and ep rank under
expert parallelism: each ep rank writes its experts, ep rank 0 the rest), and stage 0 writes the
index and config: no rank ever holds the whole model.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import torch
import torch.distributed as dist

from meshrl.parallel.layout import ParallelLayout, group_size

from .config import ConfigError, ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "char_tokenizer.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")


class CheckpointReader:
    """Name -> slice reads over a HF directory's weight files, counting the bytes it returns."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.bytes_read = 0
        self._where: dict[str, str] = {}
        self._open: dict[str, object] = {}
        st = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
        bins = sorted(glob.glob(os.path.join(model_dir, "pytorch_model*.bin")))
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                self._where = {k: os.path.join(model_dir, v) for k, v in json.load(f)["weight_map"].items()}
        elif st:
            from safetensors import safe_open
            for path in st:
                with safe_open(path, framework="pt") as f:
                    self._where.update({k: path for k in f.keys()})
        elif bins:
            for path in bins:
                sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                self._open[path] = sd
                self._where.update({k: path for k in sd})
        else:
            raise ConfigError(f"{model_dir}: no *.safetensors or pytorch_model*.bin weights found")

    def names(self):
        return self._where.keys()

    def __contains__(self, name):
        return name in self._where

    def read(self, name: str, index: tuple) -> torch.Tensor:
        path = self._where[name]
        if path.endswith(".safetensors"):
            if path not in self._open:
                from safetensors import safe_open
                self._open[path] = safe_open(path, framework="pt")
            t = self._open[path].get_slice(name)[index]
        else:
            t = self._open[path][name][index]
        t = t.clone() if not path.endswith(".safetensors") else t
        self.bytes_read += t.numel() * t.element_size()
        return t

    def full_shape(self, name: str) -> tuple[int, ...]:
        path = self._where[name]
        if path.endswith(".safetensors"):
            if path not in self._open:
                from safetensors import safe_open
                self._open[path] = safe_open(path, framework="pt")
            return tuple(self._open[path].get_slice(name).get_shape())
        return tuple(self._open[path][name].shape)


def _checkpoint_name(name: str, reader: CheckpointReader) -> str | None:
    if name in reader:
        return name
    if name == "lm_head.weight" and "model.embed_tokens.weight" in reader:
        return "model.embed_tokens.weight"  # tied checkpoints store the embedding alone
    return None


@torch.no_grad()
def load_hf_weights(stage, model_dir: str, *, new_head_std: float = 0.0, seed: int = 0) -> dict:
    """Fill ``stage``'s parameters from ``model_dir``; return {"bytes_read", "initialised"}.

    A value head absent from the checkpoint (a critic made from a causal LM) starts at N(0, std²)
    from the layout-independent initialiser (zeros by default, so initial values are 0)."""
    from meshrl.parallel.random import init_shard_
    reader = CheckpointReader(model_dir)
    initialised = []
    for pname, p in stage.named_parameters():
        spec = p.shard_spec
        src = _checkpoint_name(spec.name, reader)
        if src is None:
            if spec.name == "score.weight":
                init_shard_(p, spec, seed, new_head_std)
                initialised.append(spec.name)
                continue
            raise ConfigError(f"{model_dir}: checkpoint has no tensor '{spec.name}': is it a "
                              f"{stage.cfg.model_type} model of this config?")
        shape = reader.full_shape(src)
        if tuple(shape) != spec.full_shape:
            raise ConfigError(f"{model_dir}: '{src}' has shape {tuple(shape)}, config implies "
                              f"{spec.full_shape}: config.json and the weights disagree")
        data = reader.read(src, spec.full_index())
        if spec.dim is not None and spec.valid_len < p.shape[spec.dim]:
            p.zero_()  # vocabulary padding rows
        p[spec.local_valid_index()].copy_(data.to(p.dtype))
    return {"bytes_read": reader.bytes_read, "initialised": initialised}


def _gather_full(p: torch.Tensor, layout: ParallelLayout) -> torch.Tensor | None:
    """The full (unpadded) tensor on tp rank 0 of this stage; None elsewhere."""
    spec = p.shard_spec
    tp_group = layout.tp_group
    if spec.dim is None or group_size(tp_group) == 1:
        return p.detach()[spec.local_valid_index()] if layout.tp_rank == 0 else None
    dst = layout.rank_at(tp=0, dp=layout.dp_rank, pp=layout.pp_rank)
    parts = [torch.empty_like(p) for _ in range(layout.tp_size)] if layout.tp_rank == 0 else None
    ranges = [None] * layout.tp_size
    dist.all_gather_object(ranges, (spec.start, spec.valid_stop), group=tp_group)
    dist.gather(p.detach().contiguous(), parts, dst=dst, group=tp_group)
    if layout.tp_rank != 0:
        return None
    full = p.new_empty(spec.full_shape)
    for part, (start, stop) in zip(parts, ranges):
        if stop > start:
            idx = [slice(None)] * p.dim()
            idx[spec.dim] = slice(start, stop)
            src = [slice(None)] * p.dim()
            src[spec.dim] = slice(0, stop - start)
            full[tuple(idx)] = part[tuple(src)]
    return full


def hf_architecture(cfg: ModelConfig, head: str) -> str:
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
              "qwen3_moe": "Qwen3Moe", "mixtral": "Mixtral"}[cfg.model_type]
    return prefix + ("ForCausalLM" if head == "lm" else "ForSequenceClassification")


@torch.no_grad()
def save_hf(stage, out_dir: str, *, tokenizer_dir: str | None = None, dtype=None) -> None:
    """Write ``stage``'s model (all stages of its layout, collectively) as a HF directory:
    ``*ForCausalLM`` for an LM head, ``*ForSequenceClassification`` (num_labels=1) for a value head.
    Only the first copy of the model writes (data-parallel replica 0; under expert parallelism the
    ep ranks of the first copy of the experts)."""
    from safetensors.torch import save_file
    layout = stage.layout
    os.makedirs(out_dir, exist_ok=True)
    writes = layout.edp_rank == 0
    tensors = {}
    for _, p in stage.named_parameters() if writes else ():
        name = p.shard_spec.name
        if stage.tied_head_separate and layout.is_last_stage and not layout.is_first_stage \
                and p is stage.lm_head.weight:
            continue  # stage 0 writes the tied embedding
        if layout.ep_rank != 0 and not getattr(p, "expert_parallel", False):
            continue  # ep rank 0 writes the weights every ep rank holds
        full = _gather_full(p, layout)
        if full is not None:
            tensors[name] = (full.to(dtype) if dtype else full).contiguous().cpu()
    weight_map = None
    if writes and layout.tp_rank == 0:
        files, index = layout.pp_size * layout.ep_size, layout.pp_rank * layout.ep_size + layout.ep_rank
        fname = f"model-{index + 1:05d}-of-{files:05d}.safetensors"
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map = {k: fname for k in tensors}
    maps = _gather_weight_maps(weight_map, layout)
    if writes and layout.tp_rank == 0 and layout.pp_rank == 0 and layout.ep_rank == 0:
        _write_index_and_config(stage, out_dir, maps, tokenizer_dir)
    _barrier(layout)


def _gather_weight_maps(weight_map: dict | None, layout: ParallelLayout) -> list[dict]:
    """Every writer's {name: file} (None from ranks that wrote nothing), on every rank."""
    if layout.group is None:
        return [weight_map]
    out = [None] * layout.size
    dist.all_gather_object(out, weight_map, group=layout.group)
    return [m for m in out if m is not None]


def _write_index_and_config(stage, out_dir, maps, tokenizer_dir):
    weight_map = {k: v for m in maps for k, v in m.items()}
    total = 0
    from safetensors import safe_open
    for fname in sorted(set(weight_map.values())):
        with safe_open(os.path.join(out_dir, fname), framework="pt") as f:
            for k in f.keys():
                s = f.get_slice(k)
                n = 1
                for d in s.get_shape():
                    n *= d
                total += n * torch.tensor([], dtype=_st_dtype(s.get_dtype())).element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                  f, indent=2)
    cfg_dict = stage.cfg.to_hf_dict(hf_architecture(stage.cfg, stage.head))
    if stage.head == "value":
        cfg_dict.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    dtypes = {str(t.dtype) for t in stage.parameters()}
    cfg_dict["torch_dtype"] = cfg_dict["dtype"] = next(iter(dtypes)).replace("torch.", "")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2, sort_keys=True)
    if tokenizer_dir and os.path.abspath(tokenizer_dir) != os.path.abspath(out_dir):
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(out_dir, name))


def _st_dtype(name: str):
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}.get(name, torch.float32)


def _barrier(layout: ParallelLayout):
    if layout.group is not None:
        dist.barrier(group=layout.group)
