"""Everything one run needs on every rank: config, device, layouts, models, tokenizer, rewards,
metrics, checkpoints. The algorithm loops (sft, rm, dpo, ppo, grpo) run on top of it."""
from __future__ import annotations

import contextlib
import importlib
import os
import random
import sys
import time

import torch
import torch.distributed as dist

from meshrl.engine import checkpoint
from meshrl.engine.data.tokenizer import load_tokenizer
from meshrl.engine.distributed import init_distributed, is_main, world
from meshrl.engine.model import save_hf
from meshrl.engine.tasks import get_verifier

from .config import RunConfig, RunConfigError, to_yaml
from .metrics import MetricsLogger, progress
from .models import ModelRuntime, build_layouts, complete_calls, model_heads

TRAIN_CALLS = ("actor_train", "critic_train", "rm_train")


def make_verifier(name: str | None, args: dict):
    """A built-in verifier by name, or any importable one as "package.module:attr" (a callable
    ``(records, completions) -> scores``, or a class to construct with ``args``)."""
    if not name:
        return None
    if ":" not in name:
        return get_verifier(name, **args)
    module, attr = name.split(":", 1)
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RunConfigError(f"reward.verifier={name}: cannot import it ({e})") from None
    return obj(**args) if isinstance(obj, type) else obj


class RunContext:
    def __init__(self, cfg: RunConfig, *, optim_steps: dict[str, int] | None = None):
        self.cfg = cfg
        self.device = init_distributed()
        self.world, self.main = world(), is_main()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.calls = complete_calls(cfg, self.world)
        self.layouts = build_layouts(self.calls, self.world)
        self._check_colocated()
        heads = model_heads(self.calls)
        trained = {self.calls[c].model for c in TRAIN_CALLS if c in self.calls}
        self.models: dict[str, ModelRuntime] = {}
        for name in self._build_order(heads):
            layout = self.layout_of_model(name)
            self.models[name] = ModelRuntime(
                name, cfg.models[name], heads[name], layout, device=self.device, seed=cfg.seed,
                trains=name in trained, optim_steps=(optim_steps or {}).get(name)).build(self.models)
        self.tokenizer = self._tokenizer()
        eos = set(self.actor_config().eos_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)
        self.verifier = make_verifier(cfg.reward.verifier, cfg.reward.verifier_args)
        if self.main:
            os.makedirs(cfg.run_dir, exist_ok=True)
        self.barrier()
        self.host_state: dict = {}
        self.timings: dict[str, float] = {}
        self.start_step = self._maybe_resume()
        self.logger = MetricsLogger(cfg.run_dir, enabled=self.main, tensorboard=cfg.logging.tensorboard,
                                    resume_step=self.start_step if self.start_step else None)
        if self.main:
            with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))

    # ---- layout plumbing ------------------------------------------------------------------------
    def _check_colocated(self):
        """Calls of one model must share its layout until weights are reallocated between them."""
        by_model = {}
        for name, c in self.calls.items():
            by_model.setdefault(c.model, []).append(name)
        for model, names in by_model.items():
            layouts = {id(self.layouts[n]) for n in names}
            if len(layouts) > 1:
                raise RunConfigError(f"model {model}: calls {sorted(names)} use different layouts; "
                                     "give them the same ranks/tp/pp/dp")
        for name, layout in self.layouts.items():
            if sorted(layout.ranks) != list(range(self.world)):
                raise RunConfigError(f"calls.{name}: covers ranks {layout.ranks}, but every call "
                                     f"must span all {self.world} ranks (colocated models)")

    def _build_order(self, heads):
        names = [n for n in self.cfg.models if n in heads]
        done, order = set(), []
        while names:
            for n in list(names):
                dep = self.cfg.models[n].init_from
                if dep is None or dep in done or dep not in heads:
                    order.append(n)
                    done.add(n)
                    names.remove(n)
        return order

    def layout_of_model(self, model: str):
        for name in TRAIN_CALLS + tuple(sorted(self.calls)):
            if name in self.calls and self.calls[name].model == model:
                return self.layouts[name]
        raise RunConfigError(f"model {model} has no call")

    def model(self, call: str) -> ModelRuntime:
        return self.models[self.calls[call].model]

    def has(self, call: str) -> bool:
        return call in self.calls

    def layout(self, call: str):
        return self.layouts[call]

    def max_tokens(self, call: str) -> int:
        return self.calls[call].microbatch_tokens

    def sp_pad(self, call: str) -> int:
        m = self.model(call)
        return m.layout.tp_size if m.stage.sequence_parallel else 1

    def dp_share(self, items: list, call: str) -> tuple[list, int]:
        """This replica's contiguous share of a global list and the global index of its first item."""
        layout = self.layouts[call]
        n, d, r = len(items), layout.dp_size, layout.dp_rank
        lo, hi = r * n // d, (r + 1) * n // d
        return items[lo:hi], lo

    def actor_config(self):
        name = "actor" if "actor" in self.models else next(iter(self.models))
        return self.models[name].stage.cfg

    def _tokenizer(self):
        for m in self.models.values():
            if m.source_dir is not None:
                try:
                    return load_tokenizer(m.source_dir)
                except FileNotFoundError:
                    continue
        tok = self.cfg.extra.get("tokenizer")
        if tok:
            return load_tokenizer(tok)
        raise RunConfigError("no tokenizer: put tokenizer files in the model directory or set "
                             "extra.tokenizer=DIR")

    # ---- run services ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def timed(self, call: str):
        """Accumulate this block's wall time (device work included) under ``time/<call>``; the
        loop logs the sums every step, which is what `meshrl bench` and `meshrl plan` compare."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type != "cpu":
                torch.accelerator.synchronize()
            self.timings[call] = self.timings.get(call, 0.0) + time.perf_counter() - t0

    def pop_timings(self) -> dict:
        out = {f"time/{k}": v for k, v in self.timings.items()}
        self.timings = {}
        return out

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()

    def progress(self, total: int, desc: str, initial: int = 0):
        # redirected output gets a line every 10 s, not one per step
        quiet = {} if sys.stderr.isatty() else {"mininterval": 10.0}
        bar = progress(total, desc=desc, enabled=self.main and self.cfg.logging.progress, **quiet)
        if initial:
            bar.update(initial)
        return bar

    def log(self, step: int, metrics: dict, phase: str = "train"):
        self.logger.log(step, metrics, phase=phase)

    def trained_models(self) -> dict:
        return {n: m for n, m in self.models.items() if m.trainer is not None}

    def save(self, step: int):
        models = {n: m.stage for n, m in self.models.items()}
        trainers = {n: m.trainer for n, m in self.trained_models().items()}
        checkpoint.save(self.cfg.run_dir, step, models, trainers, self.host_state)

    def _maybe_resume(self) -> int:
        if not self.cfg.resume:
            return 0
        ckpt = checkpoint.latest(self.cfg.run_dir)
        if ckpt is None:
            return 0
        models = {n: m.stage for n, m in self.models.items()}
        trainers = {n: m.trainer for n, m in self.trained_models().items()}
        self.host_state = checkpoint.load(ckpt, models, trainers)
        if self.main:
            print(f"resumed from {ckpt}")
        return int(self.host_state["step"])

    def save_hf_models(self):
        """Trained models as Hugging Face directories under run_dir/hf/NAME (tokenizer copied)."""
        tok_dir = next((m.source_dir for m in self.models.values() if m.source_dir), None)
        tok_dir = tok_dir or self.cfg.extra.get("tokenizer")
        for name, m in self.trained_models().items():
            save_hf(m.stage, os.path.join(self.cfg.run_dir, "hf", name), tokenizer_dir=tok_dir)

    def close(self):
        self.logger.close()
