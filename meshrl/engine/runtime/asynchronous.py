"""Asynchronous RL (``async:``): the actor's generation call samples the next batches on a mesh of
its own while the other meshes train on the current one.

**The schedule.** The policy's *version* counts the iterations it has trained: the synchronous
loop samples iteration v's batch with version v. With ``max_staleness`` N and ``sync_every`` S the
loop keeps ``depth`` = N − S + 1 batches sampled ahead. Iteration t trains batch t and, while it
does, the generation mesh samples batch t + depth; at the start of every iteration t with
t mod S = 0 the actor's weights move to the generation mesh (a reallocation). So batch b ≥ depth is
sampled in iteration b − depth with the weights of the last move, version
(b − depth) − ((b − depth) mod S) ≥ b − depth − S + 1 = b − N, and trained from version b: at most
N versions after the one that sampled it (`AsyncSchedule.sampler_version`). The first ``depth``
batches are sampled by version 0 before iteration 0 trains. N = 0 is the synchronous loop, which
does not come here.

**Where it runs.** The generation call runs on a thread of each rank of its layout
(`Executor.launch`), which must share no rank with any other call (the executor checks it before
any model loads): those ranks' main threads only join the other meshes' gathers meanwhile (and run
host work such as the verifier). A failure there reaches every rank as one line
(`LaunchedCallError`), at its next gather or while it waits for the batch.

**What a checkpoint keeps.** The batches sampled ahead with each token's version and behaviour
log-prob (host state), so a resumed run trains on the batches the uninterrupted one would.
Checkpoints fall on weight moves (``logging.save_every`` is a multiple of S), where the generation
mesh receives the checkpoint's own weights; a run's first iteration always moves them.
"""
from __future__ import annotations

from dataclasses import dataclass

from meshrl.engine.dataflow import ACTOR_GEN

from .rollout import Rollout, flatten, sample_now

_STATE_KEY = "async"  # host_state["async"]: the batches sampled ahead


@dataclass(frozen=True)
class AsyncSchedule:
    """Which iteration moves weights and which batch each iteration launches (module docstring)."""
    max_staleness: int
    sync_every: int
    total: int  # iterations of the run: nothing is sampled past the last

    @property
    def depth(self) -> int:
        return self.max_staleness - self.sync_every + 1

    def moves_weights(self, it: int) -> bool:
        return it % self.sync_every == 0

    def launches(self, it: int) -> int | None:
        """The batch iteration ``it`` samples while it trains (None past the run's end)."""
        b = it + self.depth
        return b if b < self.total else None

    def sampler_version(self, batch: int) -> int:
        """The version that samples ``batch`` in a run started at iteration 0."""
        if batch < self.depth:
            return 0
        launched_in = batch - self.depth
        return launched_in - launched_in % self.sync_every


def correction(cfg) -> str:
    """``async.correction`` resolved: decoupled when batches may be stale, else none."""
    A = cfg.async_
    return A.correction or ("decoupled" if A.max_staleness else "none")


def staleness_metrics(roll: Rollout, version: int, max_staleness: int) -> dict:
    """``async/staleness_*`` of a batch trained from ``version``: the mean and max over its tokens
    of (version − the version that sampled the token), and the histogram (the fraction of tokens
    at each staleness 0..max_staleness)."""
    flat, _ = flatten(roll.versions)
    if not flat.numel():
        return {}
    stale = version - flat.long()
    out = {"async/staleness_mean": stale.float().mean().item(),
           "async/staleness_max": float(stale.max().item())}
    for s in range(max_staleness + 1):
        out[f"async/staleness_frac_{s}"] = (stale == s).float().mean().item()
    return out


def busy_fractions(metrics: dict) -> dict:
    """The generation mesh's and the other meshes' busy fractions of a step, from its timers: the
    generation's own seconds, and the seconds the others waited for it (``time/wait/actor_gen``)."""
    wait, step = metrics.get(f"time/wait/{ACTOR_GEN}"), metrics.get("step_seconds")
    if wait is None or not step:
        return {}
    return {"async/gen_busy": min(1.0, metrics.get(f"time/{ACTOR_GEN}", 0.0) / step),
            "async/train_busy": max(0.0, 1.0 - wait / step)}


def sampled_ahead(ctx, total: int, make_job) -> "SampledAhead | None":
    """The loop's batches sampled ahead under ``async.max_staleness`` > 0 over ``total``
    iterations; None for the synchronous loop (which drops any batches a checkpoint saved ahead:
    it samples each batch with the current policy)."""
    A = ctx.cfg.async_
    if not A.max_staleness:
        ctx.host_state.pop(_STATE_KEY, None)
        return None
    return SampledAhead(ctx, AsyncSchedule(A.max_staleness, A.sync_every, total), make_job)


class SampledAhead:
    """The batches the generation mesh sampled ahead of training, and the one it is sampling.
    ``make_job(batch, version) -> (Job, finish)`` is the loop's sampling call for a batch."""

    def __init__(self, ctx, schedule: AsyncSchedule, make_job):
        self.ctx, self.schedule, self.make_job = ctx, schedule, make_job
        saved = ctx.host_state.get(_STATE_KEY)
        self.queue: list[Rollout] = []
        self.gen_version = 0
        self.settings = settings = {"max_staleness": schedule.max_staleness,
                                    "sync_every": schedule.sync_every}
        if saved is not None and saved.get("settings") != settings:
            # batches sampled under other settings could break this run's bound: sample afresh
            if ctx.main:
                print(f"async: {ctx.cfg.run_dir}'s checkpoint holds {len(saved['queue'])} batches sampled "
                      f"ahead under {saved.get('settings', 'other settings')}; this run has {settings}, "
                      "so it samples them again with the checkpoint's weights")
            saved = None
        if saved is not None:
            self.queue = [Rollout.from_state(r) for r in saved["queue"]]
        self.running = None
        self.started = False  # the first iteration moves weights whatever the schedule says

    def take(self, it: int) -> Rollout:
        """Batch ``it`` to train on; the generation mesh starts on batch it + depth (collective)."""
        x, sch = self.ctx.executor, self.schedule
        if sch.moves_weights(it) or not self.started:  # (a resume off the schedule: a sync
            x.prepare(ACTOR_GEN)                          # run's checkpoint holds no batches)
            self.gen_version, self.started = it, True
        elif x.is_current(ACTOR_GEN):  # refilled since the last move (an evaluation): current
            self.gen_version = it
        while len(self.queue) < sch.depth and it + len(self.queue) < sch.total:
            # the first iteration (or a resume from a checkpoint without batches sampled ahead)
            self.queue.append(sample_now(self.ctx, *self.make_job(it + len(self.queue), self.gen_version)))
        b = sch.launches(it)
        if b is not None:
            job, finish = self.make_job(b, self.gen_version)
            self.running = (x.launch(job), finish)
        return self.queue.pop(0)

    def collect(self):
        """Wait for the batch being sampled (collective) and keep it, with the queue, in the host
        state the next checkpoint saves."""
        x = self.ctx.executor
        if self.running is not None:
            run, finish = self.running
            self.running = None
            self.queue.append(finish(x.collect(run)))
        else:  # past the last batch: nothing to wait for (the step still reports its busy fractions)
            x.add_time(f"wait/{ACTOR_GEN}", 0.0)
        self.ctx.host_state[_STATE_KEY] = {"settings": self.settings,
                                           "queue": [r.state() for r in self.queue]}

    def metrics(self, roll: Rollout, it: int) -> dict:
        return staleness_metrics(roll, it, self.schedule.max_staleness)
