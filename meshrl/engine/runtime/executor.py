"""The executor of one run, on every rank: the calls' layouts, the models in their home layouts and
their views in the others, and the model function calls over them — sharded calls and training
steps issued a phase at a time (one gather per phase, so calls on disjoint meshes compute at the
same time), reallocations into views and blends between models. It runs the dataflow table's
calls (`meshrl.engine.dataflow`) and records what each step executed; it keeps no metrics, files
or schedules (`RunServices`) and knows nothing of an algorithm's math (the loops)."""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from meshrl.engine.dataflow import DATAFLOW_TIMER, TRAIN_CALLS, Call, async_overlap_error, dataflow
from meshrl.engine.distributed import default_store, grace_s

from .config import RunConfig, RunConfigError
from .models import ModelRuntime, build_layouts, complete_calls, load_model_config, model_heads
from .placement import View, all_gather_objects, blend_into, is_reporter, share


def _in_dataflow(method):
    """An executor operation the step's dataflow time counts (`Executor._dataflow_time`)."""
    @functools.wraps(method)
    def timed_method(self, *args, **kwargs):
        with self._dataflow_time():
            return method(self, *args, **kwargs)
    return timed_method


@dataclass
class Job:
    """One sharded call: ``fn(stage, local_items, first_index)`` over the call's data shares."""
    call: str
    items: list
    fn: object
    reporter_only: bool = False
    timer: str | None = None


@dataclass
class Launched:
    """A sharded call computing in the background on its layout's ranks (`Executor.launch`)."""
    job: Job
    key: str  # its keys in the store: ``KEY/done`` (a count), ``KEY/failed``, ``KEY/ended``
    thread: threading.Thread | None = None  # None on ranks outside the call's layout
    result: tuple | None = None  # (0, first index, results) on the replica's reporting rank
    error: BaseException | None = None
    news: str | None = None  # the failure's one line, when it failed on this rank
    seconds: float = 0.0  # the thread's wall time


class LaunchedCallError(RuntimeError):
    """A call launched in the background failed on its ranks; every rank stops with this line."""


@dataclass
class TrainJob:
    """One optimizer step: ``make_batches(local_items) -> microbatches``, ``loss_fn_of(mbs)``."""
    call: str
    items: list
    make_batches: object
    loss_fn_of: object


class Executor:
    """Layouts, models, views and the calls over them. ``timed(name, label)`` is the run's timer
    (`RunServices.timed`), ``watchdog`` its hang reporter; every method that moves data is
    collective over the world (every rank calls it for the same calls in the same order)."""

    def __init__(self, cfg: RunConfig, *, world: int, rank: int, device, watchdog, timed,
                 add_time=None, optim_steps: dict[str, int] | None = None):
        self.cfg, self.world, self.rank, self.device = cfg, world, rank, device
        self.watchdog, self.timed = watchdog, timed
        self.add_time = add_time or (lambda name, seconds: None)  # ``time/<name>`` += seconds
        self.calls = complete_calls(cfg, world)
        self.flow = dataflow(cfg.algorithm)
        self.layouts = build_layouts(self.calls, world)
        # asynchronous generation runs beside the other calls: on ranks of its own (before any load)
        err = async_overlap_error(cfg.async_.max_staleness, {n: l.ranks for n, l in self.layouts.items()})
        if err is not None:
            raise RunConfigError(err)
        heads = model_heads(self.calls)
        trained = {self.calls[c].model for c in TRAIN_CALLS if c in self.calls}
        self.models: dict[str, ModelRuntime] = {}
        for name in self._build_order(heads):
            self.models[name] = ModelRuntime(
                name, cfg.models[name], heads[name], self.layout_of_model(name), device=device,
                seed=cfg.seed, trains=name in trained, optim_steps=(optim_steps or {}).get(name),
                stage_config=load_model_config(cfg.models[name], cfg.models)).build(self.models)
        self._blend_plans: dict = {}
        self.views = {call: View(self.model(call), self.layouts[call], node_of=self.node_of)
                      for call in sorted(self.calls)
                      if self.layouts[call] is not self.model(call).layout}
        self.realloc_bytes: dict[str, int] = {}
        self.executed: list[dict] = []  # this step's gathers, refills and blends, in order
        self._dataflow_timing = False
        self._launched: list[Launched] = []  # calls computing in the background, not yet collected
        self._gather_group, self._store, self._thread_store = None, None, None
        self._threads: list[threading.Thread] = []  # launched calls' threads on this rank
        self._launch_prefix, self._launches = "", 0
        if cfg.async_.max_staleness and dist.is_initialized():
            self._start_background(cfg)

    def _start_background(self, cfg: RunConfig):
        """What calls launched in the background need (asynchronous generation): the store their
        failures are posted in (under a key fresh for this executor, as the store outlives runs
        and restarts) and, on NCCL, a gloo group for the gathers: a generation rank's main thread
        gathers while its generation thread runs its own groups' NCCL collectives and CUDA graph
        captures, which then meet no other thread's NCCL calls (whose order across ranks nothing
        would fix)."""
        if dist.get_backend() == "nccl":
            t = cfg.dist.timeout_s
            self._gather_group = dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=t + grace_s(t)))
        # one store connection per thread: a blocking wait and a set must not share a socket
        store = default_store()
        self._store, self._thread_store = store.clone(), store.clone()
        token = uuid.uuid4().hex if self.rank == 0 else None
        self._launch_prefix = f"meshrl/launched/{all_gather_objects(token)[0]}"

    def computing_in_background(self) -> bool:
        """Whether a launched call's thread still runs on this rank (collected or not: a thread
        stuck in a collective after its peer failed still holds the device)."""
        return any(t.is_alive() for t in self._threads)

    @contextlib.contextmanager
    def _dataflow_time(self):
        """Time the outermost executor operation under DATAFLOW_TIMER (an operation issued inside
        another is already counted)."""
        if self._dataflow_timing:
            yield
            return
        self._dataflow_timing = True
        try:
            with self.timed(DATAFLOW_TIMER, label="the dataflow"):
                yield
        finally:
            self._dataflow_timing = False

    def pop_executed(self) -> list[dict]:
        """What the executor did since the last call (the step's dataflow record)."""
        out, self.executed = self.executed, []
        return out

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

    @_in_dataflow
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

    def is_current(self, call: str) -> bool:
        """Whether the call's weights are its model's latest (a view refilled since the last step)."""
        view = self.views.get(call)
        return view is None or view.version == view.model.version

    def run_sharded(self, call: str, items: list, fn, *, reporter_only: bool = False) -> list:
        """``fn(stage, local_items, first_index) -> list aligned with local_items`` on every member of
        the call's layout, over its replica's share of ``items``; the replicas' results gathered to
        every rank in the order of ``items``. ``reporter_only`` runs fn on one rank per replica (host
        work such as a verifier, which must not run tp·pp times over)."""
        return self.run_sharded_many([Job(call, items, fn, reporter_only=reporter_only)])[0]

    @_in_dataflow
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
        return self._gather_results(mine, jobs)

    def _gather_results(self, mine: list, jobs: list) -> list[list]:
        """Each job's results in the order of its items, from every rank's ``(job index, first
        item, results)`` parts (`_gather`)."""
        outs = [[None] * len(job.items) for job in jobs]
        for part in self._gather(mine, ", ".join(job.call for job in jobs)):
            for k, first, res in part:
                outs[k][first:first + len(res)] = res
        return outs

    def train_call(self, call: str, items: list, make_batches, loss_fn_of) -> dict:
        """One optimizer step of the call's model on its replica's share of ``items``:
        ``make_batches(local) -> microbatches``, ``loss_fn_of(microbatches) -> loss fn``. The global
        metrics reach every rank."""
        return self.train_calls([TrainJob(call, items, make_batches, loss_fn_of)])[0]

    @_in_dataflow
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
        for part in self._gather(mine, ", ".join(job.call for job in jobs)):
            for k, metrics in part:
                outs[k] = metrics
        return outs

    def _gather(self, mine, after: str) -> list:
        """Every rank's ``mine`` (all_gather_objects), with this rank's news of a failed background
        call riding along: when any rank reports one, every rank raises the same one-line
        `LaunchedCallError` here, so no rank waits on a call that will never be collected."""
        news = next((r.news for r in self._launched if r.news is not None), None)
        with self.watchdog.inside("the gather after " + after):
            parts = all_gather_objects((news, mine), group=self._gather_group)
        for news, _ in parts:
            if news is not None:
                raise LaunchedCallError(news)
        return [part for _, part in parts]

    def _failure(self, run: Launched) -> str:
        """The failed call's line (its traceback goes to this rank's stderr)."""
        e, layout = run.error, self.layouts[run.job.call]
        traceback.print_exception(e, file=sys.stderr)
        text = (str(e).splitlines() or [""])[0]
        return (f"{run.job.timer or run.job.call} failed on rank {self.rank} of its mesh (ranks "
                f"{layout.ranks}, tp{layout.tp_size}·pp{layout.pp_size}·dp{layout.dp_size}), "
                f"computing in the background: {type(e).__name__}: {text}; every rank stops here")

    def launch(self, job: Job) -> Launched:
        """Start a sharded call on a thread of each rank of its layout and return at once; every
        rank goes on issuing other calls (collective ones included) until `collect`. The call's
        layout must share no rank with the calls issued meanwhile (its model's weights and its
        groups' collectives belong to that thread until collected); it issues nothing to the
        world. A failure reaches every rank at its next gather (`_gather`), or in `collect` through
        the store (its layout's other ranks may be stuck in a collective with the failed one)."""
        self._launches += 1
        run = Launched(job, key=f"{self._launch_prefix}/{self._launches}")
        layout = self.layouts[job.call]
        if layout.is_member:
            local, first = share(job.items, layout)
            stage, device, store = self.stage(job.call), self.device, self._thread_store

            def work():
                t0 = time.perf_counter()
                try:
                    if device.type != "cpu":  # a thread starts on device 0, not on its rank's
                        torch.accelerator.set_device_index(device.index)
                    res = job.fn(stage, local, first)
                    if device.type != "cpu":
                        torch.accelerator.synchronize()
                    if is_reporter(layout):
                        run.result = (0, first, list(res))
                except BaseException as e:  # noqa: BLE001 - relayed to every rank (_gather, collect)
                    run.error = e
                    try:
                        run.news = self._failure(run)
                    except BaseException:  # noqa: BLE001 - an exception that cannot be printed
                        run.news = f"{job.timer or job.call} failed on rank {self.rank}: {type(e).__name__}"
                run.seconds = time.perf_counter() - t0
                if store is not None:
                    self._post(store, run, members=len(layout.ranks))

            run.thread = threading.Thread(target=work, name=f"meshrl-{job.call}", daemon=True)
            run.thread.start()
            self._threads = [t for t in self._threads if t.is_alive()] + [run.thread]
        self._launched.append(run)
        return run

    @staticmethod
    def _post(store, run: Launched, *, members: int):
        """A member thread's end in the store: its failure (the first posted wins, so every rank
        raises the same line) and ``ended``, which wakes every waiter at once; or its count, the
        last of the layout's members setting ``ended``."""
        try:
            if run.news is not None:
                store.compare_set(f"{run.key}/failed", "", run.news)
                store.set(f"{run.key}/ended", "failed")
            elif store.add(f"{run.key}/done", 1) == members:
                store.set(f"{run.key}/ended", "done")
        except Exception as e:  # noqa: BLE001 - the waiters time out instead; say why here
            print(f"meshrl: rank could not post {run.job.call}'s end in the store: {e!r}", file=sys.stderr)

    @_in_dataflow
    def collect(self, run: Launched) -> list:
        """A launched call's results, gathered to every rank in the order of its items (collective
        over the world, as `run_sharded`). The call's time goes under ``time/<call>``; the time the
        ranks outside its layout waited here under ``time/wait/<call>``: their idle time."""
        job, t0 = run.job, time.perf_counter()
        self.executed.append({"gather": [{"call": job.timer or job.call, "layout": job.call,
                                          "launched": True}]})
        name = job.timer or job.call
        with self.watchdog.inside(f"{name} (in the background)"):
            if self._store is not None:
                self._wait_done(run)
            if run.thread is not None:
                run.thread.join()
        try:
            out = self._gather_results([] if run.result is None else [run.result], [job])[0]
        finally:
            self._launched.remove(run)
        if run.thread is not None:
            self.add_time(name, run.seconds)
        else:
            self.add_time(f"wait/{name}", time.perf_counter() - t0)
        return out

    def _wait_done(self, run: Launched):
        """Until every rank of the launched call's layout has finished it, or one has posted its
        failure, which every rank then raises alike (a blocking wait on the store's ``ended`` key:
        no polling)."""
        t = self.cfg.dist.timeout_s
        self._store.wait([f"{run.key}/ended"], datetime.timedelta(seconds=t + grace_s(t)))
        if self._store.check([f"{run.key}/failed"]):
            raise LaunchedCallError(self._store.get(f"{run.key}/failed").decode())

    @_in_dataflow
    def blend(self, dst: str, src: str, alpha: float | None):
        """dst model ← α·dst + (1−α)·src (EMA), or a copy when alpha is None."""
        blend_into(self.models[dst], self.models[src], self._blend_plans, alpha=alpha,
                   node_of=self.node_of)
        self.models[dst].version += 1
        self.executed.append({"blend": dst, "from": src})

    def has(self, call: str) -> bool:
        return call in self.calls

    def rows(self) -> list[tuple[int, Call]]:
        """(phase, call) of every dataflow call this run runs, in the table's order."""
        return self.flow.rows(self.cfg, self.calls)

    def blends(self, every: str) -> list[tuple[str, str]]:
        """(dst model, src model) of the dataflow's blends this run makes ``every`` (`blend`)."""
        return [(self.calls[b.dst].model, self.calls[b.src].model)
                for b in self.flow.active_blends(self.cfg, self.calls) if b.every == every]

    def runs(self, call: str) -> bool:
        """Whether the dataflow's call ``call`` runs in this run (laid out, and its condition holds)."""
        return any(c.name == call and self.flow.runs(c, self.cfg, self.calls) for c in self.flow.calls())

    def phase(self, name: str) -> list:
        """The dataflow phase's calls that run in this run, in the table's order."""
        return [c for c in self.flow.phase(name).calls if self.flow.runs(c, self.cfg, self.calls)]

    def layout(self, call: str):
        return self.layouts[call]

    def max_tokens(self, call: str) -> int:
        return self.calls[call].microbatch_tokens

    def sp_pad(self, call: str) -> int:
        m, layout = self.model(call), self.layouts[call]
        return layout.tp_size if m.spec.sequence_parallel and layout.tp_size > 1 else 1

    def trained_models(self) -> dict:
        """Models with an optimizer (on every rank, whether or not it holds them)."""
        return {n: m for n, m in self.models.items() if m.trains}

    def held(self) -> tuple[dict, dict]:
        """(stages, trainers) this rank holds, by model: what a checkpoint saves and loads."""
        models = {n: m.stage for n, m in self.models.items() if m.stage is not None}
        trainers = {n: m.trainer for n, m in self.models.items() if m.trainer is not None}
        return models, trainers

    def home_layouts(self) -> dict:
        """Each model's home layout, as checkpoints record it (shards load only into it)."""
        # ep only when > 1, so checkpoints saved before expert parallelism still match
        return {n: {"ranks": list(m.layout.ranks), "tp": m.layout.tp_size, "pp": m.layout.pp_size,
                    "dp": m.layout.dp_size,
                    **({"ep": m.layout.ep_size} if m.layout.ep_size > 1 else {})}
                for n, m in self.models.items()}

    def placement_report(self, searched: dict | None) -> dict:
        """Where each call runs and what reallocating each view moves (run_dir/placement.json);
        printed too."""
        report = {"calls": {n: {"model": c.model, "ranks": self.layouts[n].ranks, "tp": c.tp,
                                "pp": c.pp, "dp": c.dp, "ep": c.ep,
                                "microbatch_tokens": c.microbatch_tokens}
                            for n, c in self.calls.items()},
                  "reallocation": {}}
        if searched is not None:  # calls: auto
            report["search"] = searched
            print(f"calls: auto: searched {searched['searched']} on {self.world} ranks, estimate "
                  f"{searched['estimate_seconds']:.4g} s per step ({searched['rates']} rates): "
                  + ", ".join(f"{n} {c.tp}·{c.pp}·{c.dp}{f'·ep{c.ep}' if c.ep > 1 else ''} on "
                              f"{c.ranks}" for n, c in self.calls.items()))
        for call, view in self.views.items():
            st = view.plan.stats()
            keep = ("remote_bytes", "local_bytes", "cross_node_bytes", "senders", "sender_max_bytes",
                    "sender_min_bytes", "recv_over_min_max")
            report["reallocation"][call] = {k: st[k] for k in keep}
            print(f"realloc {self.model(call).name} home -> {call}: "
                  f"{st['remote_bytes'] / 2**20:.2f} MiB remote ({st['cross_node_bytes'] / 2**20:.2f} "
                  f"MiB across nodes), {st['local_bytes'] / 2**20:.2f} MiB local copies, "
                  f"{st['senders']} senders, max/min {st['sender_max_over_min']:.2f}")
        return report
