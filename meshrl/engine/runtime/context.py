"""Everything one run needs on every rank, in three parts: the executor (layouts, models, views and
the calls over them: `executor.py`), the run's services (metrics, timings, progress, checkpoints:
`services.py`) and what the loops read besides (config, tokenizer, verifier, host state kept in
checkpoints, held-out data). The algorithm loops (sft, rm, dpo, ppo, grpo) run on top of it."""
from __future__ import annotations

import importlib
import json
import os
import random

import torch
import torch.distributed as dist

from meshrl.engine.data.tokenizer import load_tokenizer
from meshrl.engine.distributed import default_store, init_distributed, is_main, world
from meshrl.engine.tasks import get_verifier
from meshrl.engine.watchdog import Watchdog

from .config import RunConfig, RunConfigError, to_yaml
from .executor import Executor, Job, TrainJob  # noqa: F401  (the loops' job types)
from .services import RunServices


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
    """``executor`` runs the calls, ``services`` keeps the records; the loops read ``cfg``,
    ``tokenizer``, ``eos_ids``, ``verifier``, ``host_state`` (saved with every checkpoint),
    ``held_out`` and ``start_step`` (the step a resumed run continues from)."""

    def __init__(self, cfg: RunConfig, *, optim_steps: dict[str, int] | None = None, plan_calls=None):
        """``plan_calls(cfg, world, gpus_per_node) -> (cfg, record)`` chooses the layouts of a
        config's ``calls: auto`` (the planner's search; `meshrl.launch` passes it in, so the
        runtime never imports the planner)."""
        self.cfg = cfg
        self.device = init_distributed(cfg.dist.timeout_s)
        self.world, self.main = world(), is_main()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.watchdog = Watchdog(cfg.dist.timeout_s, rank=self.rank, world=self.world,
                                 store=default_store()).start()
        self.services = None
        try:
            self._setup(cfg, optim_steps, plan_calls)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: RunConfig, optim_steps: dict[str, int] | None, plan_calls):
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.searched = None
        if cfg.auto_calls:  # calls: auto, searched on the cluster torchrun gives
            if plan_calls is None:
                raise RunConfigError(f"calls: auto ({', '.join(cfg.auto_calls)}): this entry point has "
                                     "no planner; start the run with `meshrl run` (meshrl.launch)")
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or cfg.cluster.gpus_per_node
            cfg, self.searched = plan_calls(cfg, self.world, per_node)
            self.cfg = cfg
        self.services = RunServices(cfg, main=self.main, device=self.device, watchdog=self.watchdog)
        self.executor = Executor(cfg, world=self.world, rank=self.rank, device=self.device,
                                 watchdog=self.watchdog, timed=self.services.timed,
                                 add_time=self.services.add_time, optim_steps=optim_steps)
        self.services.may_sync_device = lambda: not self.executor.computing_in_background()
        self._check_vocabularies()
        self._check_context()
        self.tokenizer = self._tokenizer()
        eos = set(self.actor_config().eos_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)
        self.verifier = make_verifier(cfg.reward.verifier, cfg.reward.verifier_args)
        if self.main:
            os.makedirs(cfg.run_dir, exist_ok=True)
        self.barrier()
        self.held_out: dict = {}  # held-out data by kind, loaded once (common.held_out)
        self.host_state: dict = self.services.resume(self.executor) or {}
        self.start_step = int(self.host_state.get("step", 0))
        self.services.start_logging(self.start_step)
        if self.main:
            with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
            with open(os.path.join(cfg.run_dir, "placement.json"), "w") as f:
                json.dump(self.executor.placement_report(self.searched), f, indent=1)

    # ---- steps and checkpoints ------------------------------------------------------------------
    def end_step(self, step: int | None) -> dict:
        """Close a step's records (collective): its ``time/<call>`` sums, and for the run's first
        two steps what it executed (run_dir/dataflow.json). ``step=None`` discards them (an
        evaluation is not part of the step being timed)."""
        timings, executed = self.services.pop_timings(), self.executor.pop_executed()
        if step is not None and step < self.start_step + 2:
            self.services.record_dataflow(step, self.executor, executed, self.start_step)
        return timings

    def save(self, step: int):
        self.services.save(step, self.executor, self.host_state)

    def save_hf_models(self):
        self.services.save_hf_models(self.executor)

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()

    def actor_config(self):
        name = "actor" if "actor" in self.executor.models else next(iter(self.executor.models))
        return self.executor.models[name].stage_config

    def _check_vocabularies(self):
        """Every model reads the actor's token ids (the reward model scores its samples), so none
        may have a smaller vocabulary."""
        if "actor" not in self.executor.models:
            return
        need = self.executor.models["actor"].stage_config.vocab_size
        for name, m in self.executor.models.items():
            if m.stage_config.vocab_size < need:
                raise RunConfigError(f"models.{name}: its vocabulary of {m.stage_config.vocab_size} is "
                                     f"smaller than models.actor's {need}; it reads the actor's token "
                                     "ids, so it needs a model with the actor's tokenizer")

    def _check_context(self):
        """The longest sequence a model will read fits its context (positions past
        max_position_embeddings were never trained)."""
        d, g, alg = self.cfg.data, self.cfg.generation, self.cfg.algorithm
        if alg in ("ppo", "grpo") or (alg == "dpo" and self.cfg.dpo.rounds):
            need = d.max_prompt_len + g.max_new_tokens
            keys = "data.max_prompt_len + generation.max_new_tokens"
        else:
            need, keys = d.max_len, "data.max_len"
        for name, m in self.executor.models.items():
            limit = m.stage_config.max_position_embeddings
            if need > limit:
                raise RunConfigError(f"{keys} = {need} passes models.{name}'s context of {limit} "
                                     "(max_position_embeddings): lower it")

    def _tokenizer(self):
        """The policy's tokenizer (actor, else the reward model being trained), else the first
        model directory holding one: the data is tokenized for the model that reads it."""
        order = ("actor", "reward")
        for m in sorted(self.executor.models.values(), key=lambda m: order.index(m.name) if m.name in order
                        else len(order)):
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

    def close(self):
        self.watchdog.close()
        if self.services is not None:
            self.services.close()
