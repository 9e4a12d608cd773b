"""Everything one run needs on every rank: config, device, layouts, models, tokenizer, rewards,
metrics, checkpoints. The algorithm loops (sft, rm, dpo, ppo, grpo) run on top of it."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from meshrl.engine import checkpoint
from meshrl.engine.dataflow import TRAIN_CALLS, dataflow
from meshrl.engine.data.tokenizer import load_tokenizer
from meshrl.engine.distributed import default_store, init_distributed, is_main, world
from meshrl.engine.model import save_hf
from meshrl.engine.tasks import get_verifier
from meshrl.engine.watchdog import Watchdog

from .config import RunConfig, RunConfigError, to_yaml
from .metrics import MetricsLogger, progress
from .models import ModelRuntime, build_layouts, complete_calls, load_model_config, model_heads
from .placement import View, all_gather_objects, blend_into, is_reporter, share



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


@dataclass
class Job:
    """One sharded call: ``fn(stage, local_items, first_index)`` over the call's data shares."""
    call: str
    items: list
    fn: object
    reporter_only: bool = False
    timer: str | None = None


@dataclass
class TrainJob:
    """One optimizer step: ``make_batches(local_items) -> microbatches``, ``loss_fn_of(mbs)``."""
    call: str
    items: list
    make_batches: object
    loss_fn_of: object


class RunContext:
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
        try:
            self._setup(cfg, optim_steps, plan_calls)
        except BaseException:
            self.watchdog.close()
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
        self.calls = complete_calls(cfg, self.world)
        self.flow = dataflow(cfg.algorithm)
        self.layouts = build_layouts(self.calls, self.world)
        heads = model_heads(self.calls)
        trained = {self.calls[c].model for c in TRAIN_CALLS if c in self.calls}
        self.models: dict[str, ModelRuntime] = {}
        for name in self._build_order(heads):
            self.models[name] = ModelRuntime(
                name, cfg.models[name], heads[name], self.layout_of_model(name), device=self.device,
                seed=cfg.seed, trains=name in trained, optim_steps=(optim_steps or {}).get(name),
                stage_config=load_model_config(cfg.models[name], cfg.models)).build(self.models)
        self._blend_plans: dict = {}
        self.views = {call: View(self.model(call), self.layouts[call], node_of=self.node_of)
                      for call in sorted(self.calls)
                      if self.layouts[call] is not self.model(call).layout}
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
        self.host_state: dict = {}
        self.held_out: dict = {}  # held-out data by kind, loaded once (common.held_out)
        self.timings: dict[str, float] = {}
        self.executed: list[dict] = []  # this step's gathers, refills and blends (`record_dataflow`)
        self.last_executed: list[dict] = []
        self.realloc_bytes: dict[str, int] = {}
        self.start_step = self._maybe_resume()
        self.logger = MetricsLogger(cfg.run_dir, enabled=self.main, tensorboard=cfg.logging.tensorboard,
                                    resume_step=self.start_step if self.start_step else None,
                                    trackers=cfg.logging, config=cfg)
        if self.main:
            with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
            self._report_placement()

    def _report_placement(self):
        """Where each call runs and what reallocating each view moves (also in placement.json)."""
        report = {"calls": {n: {"model": c.model, "ranks": self.layouts[n].ranks, "tp": c.tp,
                                "pp": c.pp, "dp": c.dp, "microbatch_tokens": c.microbatch_tokens}
                            for n, c in self.calls.items()},
                  "reallocation": {}}
        if self.searched is not None:  # calls: auto
            report["search"] = self.searched
            print(f"calls: auto: searched {self.searched['searched']} on {self.world} ranks, estimate "
                  f"{self.searched['estimate_seconds']:.4g} s per step ({self.searched['rates']} rates): "
                  + ", ".join(f"{n} {c.tp}·{c.pp}·{c.dp} on {c.ranks}" for n, c in self.calls.items()))
        for call, view in self.views.items():
            st = view.plan.stats()
            keep = ("remote_bytes", "local_bytes", "cross_node_bytes", "senders", "sender_max_bytes",
                    "sender_min_bytes", "recv_over_min_max")
            report["reallocation"][call] = {k: st[k] for k in keep}
            print(f"realloc {self.model(call).name} home -> {call}: "
                  f"{st['remote_bytes'] / 2**20:.2f} MiB remote ({st['cross_node_bytes'] / 2**20:.2f} "
                  f"MiB across nodes), {st['local_bytes'] / 2**20:.2f} MiB local copies, "
                  f"{st['senders']} senders, max/min {st['sender_max_over_min']:.2f}")
        with open(os.path.join(self.cfg.run_dir, "placement.json"), "w") as f:
            json.dump(report, f, indent=1)

    # ---- layout plumbing ------------------------------------------------------------------------
    def node_of(self, rank: int) -> int:
        """The node a global rank sits on: torchrun's local world size when launched by it (so a
        simulated multi-node launch is seen as such), else the cluster's GPUs per node."""
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or self.cfg.cluster.gpus_per_node
        return rank // per_node

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

    def stage(self, call: str):
        """The stage a call computes with on this rank (home or view); None outside its layout."""
        view = self.views.get(call)
        return view.stage if view is not None else self.model(call).stage

    def prepare(self, call: str):
        """Bring a view call's weights up to date (collective over the world: every rank calls
        this for the same calls in the same order)."""
        view = self.views.get(call)
        if view is None:
            return
        with self.timed(f"realloc/{call}"):
            counts = view.refresh()
        if counts is not None:
            self.realloc_bytes[call] = self.realloc_bytes.get(call, 0) + counts["sent"] + counts["local"]
            self.executed.append({"realloc": call, "model": view.model.name})

    def run_sharded(self, call: str, items: list, fn, *, reporter_only: bool = False) -> list:
        """``fn(stage, local_items, first_index) -> list aligned with local_items`` on every member of
        the call's layout, over its replica's share of ``items``; the replicas' results gathered to
        every rank in the order of ``items``. ``reporter_only`` runs fn on one rank per replica (host
        work such as a verifier, which must not run tp·pp times over)."""
        return self.run_sharded_many([Job(call, items, fn, reporter_only=reporter_only)])[0]

    def run_sharded_many(self, jobs: list["Job"]) -> list[list]:
        """Several sharded calls with one gather at the end: calls on disjoint meshes compute at the
        same time (a rank runs only the calls its layouts include), and every rank gets every result."""
        self.executed.append({"gather": [{"call": job.timer or job.call, "layout": job.call,
                                          **({"host": True} if job.reporter_only else {})}
                                         for job in jobs]})
        mine = []
        for k, job in enumerate(jobs):
            layout = self.layouts[job.call]
            if not layout.is_member or (job.reporter_only and not is_reporter(layout)):
                continue
            local, first = share(job.items, layout)
            timer = job.timer or job.call
            with self.timed(timer, label=job.call if timer == job.call else f"{job.call} ({timer})"):
                res = job.fn(self.stage(job.call), local, first)
            if is_reporter(layout):
                mine.append((k, first, list(res)))
        outs = [[None] * len(job.items) for job in jobs]
        with self.watchdog.inside("the gather after " + ", ".join(job.call for job in jobs)):
            parts = all_gather_objects(mine)
        for part in parts:
            for k, first, res in part:
                outs[k][first:first + len(res)] = res
        return outs

    def train_call(self, call: str, items: list, make_batches, loss_fn_of) -> dict:
        """One optimizer step of the call's model on its replica's share of ``items``:
        ``make_batches(local) -> microbatches``, ``loss_fn_of(microbatches) -> loss fn``. The global
        metrics reach every rank."""
        return self.train_calls([TrainJob(call, items, make_batches, loss_fn_of)])[0]

    def train_calls(self, jobs: list["TrainJob"]) -> list[dict]:
        """Several models' optimizer steps with one gather of their metrics at the end: models
        trained on disjoint meshes step at the same time (a rank steps only the models whose
        layouts include it), and every rank gets every call's metrics (from its first rank)."""
        self.executed.append({"gather": [{"call": job.call, "layout": job.call} for job in jobs]})
        mine = []
        for k, job in enumerate(jobs):
            model, layout = self.model(job.call), self.layouts[job.call]
            if not layout.is_member:
                model.version += 1
                continue
            with self.timed(job.call):
                mbs = job.make_batches(share(job.items, layout)[0])
                metrics = model.step(mbs, job.loss_fn_of(mbs))
            if self.rank == layout.ranks[0]:
                mine.append((k, metrics))
        outs = [None] * len(jobs)
        with self.watchdog.inside("the gather after " + ", ".join(job.call for job in jobs)):
            for part in all_gather_objects(mine):
                for k, metrics in part:
                    outs[k] = metrics
        return outs

    def blend(self, dst: str, src: str, alpha: float | None):
        """dst model ← α·dst + (1−α)·src (EMA), or a copy when alpha is None."""
        blend_into(self.models[dst], self.models[src], self._blend_plans, alpha=alpha,
                   node_of=self.node_of)
        self.models[dst].version += 1
        self.executed.append({"blend": dst, "from": src})

    def has(self, call: str) -> bool:
        return call in self.calls

    def runs(self, call: str) -> bool:
        """Whether the dataflow's call ``call`` runs in this run (laid out, and its condition holds)."""
        return any(c.name == call and self.flow.runs(c, self.cfg, self.calls) for c in self.flow.calls())

    def phase(self, name: str) -> list:
        """The dataflow phase's calls that run in this run, in the table's order."""
        return [c for c in self.flow.phase(name).calls if self.flow.runs(c, self.cfg, self.calls)]

    def record_dataflow(self, step: int):
        """Add what step ``step`` executed (its gathers in order, the views it refilled, the blends)
        to run_dir/dataflow.json, beside the dataflow the run declares: what `meshrl plan` prices.
        The loop records a run's first two steps (the first fills every view once; the second is
        the steady state the plan's per-step counts describe)."""
        if not self.main:
            return
        path = os.path.join(self.cfg.run_dir, "dataflow.json")
        doc = {"algorithm": self.cfg.algorithm,
               "declared": [{"phase": i, "call": c.name, "layout": c.config_call, "kind": c.kind,
                             "every": c.every} for i, c in self.flow.rows(self.cfg, self.calls)],
               "blends": [{"dst": b.dst, "src": b.src, "every": b.every}
                          for b in self.flow.active_blends(self.cfg, self.calls)],
               "steps": {}}
        if os.path.exists(path) and step != self.start_step:
            with open(path) as f:
                doc["steps"] = json.load(f)["steps"]
        doc["steps"][str(step)] = self.last_executed
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)

    def layout(self, call: str):
        return self.layouts[call]

    def max_tokens(self, call: str) -> int:
        return self.calls[call].microbatch_tokens

    def sp_pad(self, call: str) -> int:
        m, layout = self.model(call), self.layouts[call]
        return layout.tp_size if m.spec.sequence_parallel and layout.tp_size > 1 else 1

    def actor_config(self):
        name = "actor" if "actor" in self.models else next(iter(self.models))
        return self.models[name].stage_config

    def _check_vocabularies(self):
        """Every model reads the actor's token ids (the reward model scores its samples), so none
        may have a smaller vocabulary."""
        if "actor" not in self.models:
            return
        need = self.models["actor"].stage_config.vocab_size
        for name, m in self.models.items():
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
        for name, m in self.models.items():
            limit = m.stage_config.max_position_embeddings
            if need > limit:
                raise RunConfigError(f"{keys} = {need} passes models.{name}'s context of {limit} "
                                     "(max_position_embeddings): lower it")

    def _tokenizer(self):
        """The policy's tokenizer (actor, else the reward model being trained), else the first
        model directory holding one: the data is tokenized for the model that reads it."""
        order = ("actor", "reward")
        for m in sorted(self.models.values(), key=lambda m: order.index(m.name) if m.name in order
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

    # ---- run services ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def timed(self, call: str, label: str | None = None):
        """Accumulate this block's wall time (device work included) under ``time/<call>``; the
        loop logs the sums every step, which is what `meshrl bench` and `meshrl plan` compare.
        The watchdog reports a stall inside it as ``label`` (default: ``call``)."""
        t0 = time.perf_counter()
        try:
            with self.watchdog.inside(label or call):
                yield
        finally:
            if self.device.type != "cpu":
                torch.accelerator.synchronize()
            self.timings[call] = self.timings.get(call, 0.0) + time.perf_counter() - t0

    def pop_timings(self) -> dict:
        """This step's ``time/<call>`` sums, each the slowest rank's (collective: a call whose
        mesh leaves out the logging rank is timed where it ran)."""
        slowest: dict[str, float] = {}
        for part in all_gather_objects(self.timings):
            for k, v in part.items():
                slowest[k] = max(slowest.get(k, 0.0), v)
        self.timings = {}
        self.last_executed, self.executed = self.executed, []
        return {f"time/{k}": v for k, v in sorted(slowest.items())}

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
        """Models with an optimizer (on every rank, whether or not it holds them)."""
        return {n: m for n, m in self.models.items() if m.trains}

    def _held(self):
        models = {n: m.stage for n, m in self.models.items() if m.stage is not None}
        trainers = {n: m.trainer for n, m in self.models.items() if m.trainer is not None}
        return models, trainers

    def _home_layouts(self) -> dict:
        """Each model's home layout, as checkpoints record it (shards load only into it)."""
        return {n: {"ranks": list(m.layout.ranks), "tp": m.layout.tp_size, "pp": m.layout.pp_size,
                    "dp": m.layout.dp_size} for n, m in self.models.items()}

    def save(self, step: int):
        with self.watchdog.inside(f"saving checkpoints/step_{step}"):
            self._save(step)

    def _save(self, step: int):
        checkpoint.save(self.cfg.run_dir, step, *self._held(),
                        dict(self.host_state, layouts=self._home_layouts()),
                        keep=self.cfg.logging.keep_checkpoints)

    def _maybe_resume(self) -> int:
        if not self.cfg.resume:
            return 0
        ckpt = checkpoint.latest(self.cfg.run_dir)
        if ckpt is None:
            return 0
        self.host_state = checkpoint.load(ckpt, *self._held(), layouts=self._home_layouts())
        for m in self.models.values():
            m.version += 1  # views refill from the restored weights
        if self.main:
            print(f"resumed from {ckpt}")
        return int(self.host_state["step"])

    def save_hf_models(self):
        """Trained models as Hugging Face directories under run_dir/hf/NAME (tokenizer copied)."""
        tok_dir = next((m.source_dir for m in self.models.values() if m.source_dir), None)
        tok_dir = tok_dir or self.cfg.extra.get("tokenizer")
        for name, m in self.trained_models().items():
            if m.stage is not None:
                save_hf(m.stage, os.path.join(self.cfg.run_dir, "hf", name), tokenizer_dir=tok_dir)
        self.barrier()

    def close(self):
        self.watchdog.close()
        self.logger.close()
