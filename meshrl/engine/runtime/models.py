"""Models of a run and the layouts of their function calls.

Every call names a model and a layout (ranks, tp, pp, dp, ep). Layouts are built collectively, once
per distinct (ranks, tp, pp, dp, ep), in the order of the call names, on every rank. A model lives
in the layout of its training call (or of its first call); calls of the same model in that layout
use it directly.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import replace

import torch

from meshrl.engine.model import build_stage, config_from_hf_dict, load_config
from meshrl.engine.train import Trainer
from meshrl.parallel.layout import LayoutError, ParallelLayout, parse_ranks

from meshrl.engine.dataflow import DATAFLOWS, VALUE_CALLS

from .config import CallSpec, ModelSpec, RunConfig, RunConfigError, check_call_ep

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# every algorithm's calls and their default models, from its dataflow; the reward-scoring call's
# model is named by reward.model
DEFAULT_CALLS = {alg: {name: c.model for name, c in flow.config_calls().items() if c.model is not None}
                 for alg, flow in DATAFLOWS.items()}
REWARD_CALL = {alg: names for alg, flow in DATAFLOWS.items()
               if (names := tuple(n for n, c in flow.config_calls().items() if c.model is None))}


def complete_calls(cfg: RunConfig, world: int) -> dict[str, CallSpec]:
    """The run's calls: the algorithm's defaults (every rank, tp=pp=1) overlaid by the config's."""
    calls = {name: CallSpec(model=model) for name, model in DEFAULT_CALLS[cfg.algorithm].items()
             if model in cfg.models}
    if cfg.algorithm in REWARD_CALL and cfg.reward.model:
        calls.update({name: CallSpec(model=cfg.reward.model) for name in REWARD_CALL[cfg.algorithm]})
    known = set(DEFAULT_CALLS[cfg.algorithm]) | set(REWARD_CALL.get(cfg.algorithm, ()))
    for name in cfg.calls:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise RunConfigError(f"calls.{name}: {cfg.algorithm} runs no such call; {hint}its calls "
                                 f"are {', '.join(sorted(known))}")
    calls.update(cfg.calls)
    for name, c in calls.items():
        ranks = parse_ranks(c.ranks) if c.ranks is not None else list(range(world))
        dp = c.dp if c.dp is not None else len(ranks) // (c.tp * c.pp)
        if dp * c.tp * c.pp != len(ranks):
            raise RunConfigError(f"calls.{name}: {len(ranks)} ranks do not split into tp={c.tp} × "
                                 f"pp={c.pp} × dp: choose sizes whose product is {len(ranks)}")
        check_call_ep(name, c, dp=dp)
        c.ranks, c.dp = ",".join(map(str, ranks)), dp
    return calls


def model_heads(calls: dict[str, CallSpec]) -> dict[str, str]:
    heads = {}
    for name, c in calls.items():
        heads.setdefault(c.model, "lm")
        if name in VALUE_CALLS:
            heads[c.model] = "value"
    return heads


def build_layouts(calls: dict[str, CallSpec], world: int) -> dict[str, ParallelLayout]:
    """One ParallelLayout per call; calls with equal layouts share the object (and its groups)."""
    built, out = {}, {}
    for name in sorted(calls):
        c = calls[name]
        key = (c.ranks, c.tp, c.pp, c.dp, c.ep)
        if key not in built:
            try:
                built[key] = ParallelLayout(ranks=c.ranks, tp=c.tp, pp=c.pp, dp=c.dp, ep=c.ep,
                                            world_size=world, name=f"calls.{name}")
            except LayoutError as e:
                raise RunConfigError(str(e)) from None
        out[name] = built[key]
    return out


class ModelRuntime:
    """One model: its stage in its home layout (None on ranks outside it), its optimizer when a
    call trains it, and a version that counts weight updates (views refill when it moves)."""

    def __init__(self, name: str, spec: ModelSpec, head: str, layout: ParallelLayout, *,
                 device, seed: int, trains: bool, optim_steps: int | None, stage_config):
        self.name, self.spec, self.head, self.layout = name, spec, head, layout
        self.device, self.seed, self.trains = device, seed, trains
        self.optim_steps = optim_steps
        self.stage_config = stage_config
        self.dtype = DTYPES[spec.dtype]
        self.stage = None
        self.trainer = None
        self.version = 0
        self.source_dir = _source_dir(spec)  # the HF directory the weights came from

    def build(self, models: dict[str, "ModelRuntime"]):
        if self.spec.init_from is not None:
            self.source_dir = models[self.spec.init_from].source_dir
        if not self.layout.is_member:
            return self
        spec, kw = self.spec, dict(head=self.head, dtype=DTYPES[self.spec.dtype], device=self.device,
                                   seed=self.seed, sequence_parallel=self.spec.sequence_parallel,
                                   activation_checkpointing=self.spec.activation_checkpointing)
        if spec.path is not None:
            self.stage = build_stage(self.layout, model_dir=spec.path, **kw)
        elif spec.scratch is not None:
            cfg = config_from_hf_dict({"architectures": ["LlamaForCausalLM"], **spec.scratch})
            self.stage = build_stage(self.layout, config=cfg, **kw)
        else:
            src = models[spec.init_from]
            if src.source_dir is not None:
                self.stage = build_stage(self.layout, model_dir=src.source_dir, **kw)
            else:
                if src.layout is not self.layout:
                    raise RunConfigError(f"models.{self.name}.init_from={spec.init_from}: a model "
                                         "initialised from scratch can seed another only in the "
                                         "same layout; save it first or give it the same layout")
                self.stage = build_stage(self.layout, config=src.stage.cfg, **kw)
                copy_weights_(self.stage, src.stage)
        if self.trains:
            self.trainer = Trainer(self.stage, replace(spec.optim, total_steps=self.optim_steps))
        else:
            self.stage.requires_grad_(False)
        return self

    def step(self, microbatches, loss_fn) -> dict:
        """One optimizer step (members of the home layout); bumps the weight version."""
        self.version += 1
        return self.trainer.step(microbatches, loss_fn)

    def offload(self):
        if self.trainer is not None and self.spec.offload_when_idle:
            self.trainer.opt.offload()

    def reload(self):
        if self.trainer is not None and self.spec.offload_when_idle:
            self.trainer.opt.reload()


def _source_dir(spec: ModelSpec) -> str | None:
    return spec.path


@torch.no_grad()
def copy_weights_(dst_stage, src_stage):
    """Copy every parameter the two stages share by name (same layout): a critic or reference
    made from an in-memory actor. Parameters only ``dst`` has (a new value head) keep their init."""
    src = {p.shard_spec.name: p for p in src_stage.parameters()}
    for p in dst_stage.parameters():
        q = src.get(p.shard_spec.name)
        if q is not None and q.shape == p.shape:
            p.copy_(q)


def load_model_config(spec: ModelSpec, models: dict[str, ModelSpec]):
    """The model config a spec resolves to (following init_from), without building anything."""
    while spec.init_from is not None:
        spec = models[spec.init_from]
    if spec.path is not None:
        if not os.path.exists(os.path.join(spec.path, "config.json")):
            name = next((n for n, m in models.items() if m is spec), "?")
            raise RunConfigError(f"models.{name}.path={spec.path}: no config.json there: point it at "
                                 "a Hugging Face model directory (or give the model's shape as "
                                 f"models.{name}.scratch)")
        return load_config(spec.path)
    return config_from_hf_dict({"architectures": ["LlamaForCausalLM"], **spec.scratch})
