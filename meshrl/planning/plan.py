"""`meshrl plan CONFIG.yaml [key=value ...]`: a dry run on the CPU. Memory per GPU of every model
function call against ``cluster.gpu_mem_gb``, the reallocations between a model's layouts (priced by
the real planner on meta-built ShardSpecs) and an estimated step, from rates that committed
benchmark results give (`costmodel`). Nothing is allocated and no process group is made.

The step is the runtime's sequence of phases (PPO: generate; score; old log-probs, reference and
values; then the actor's and the critic's updates per minibatch). The calls of one phase run before
one gather of their results, so calls on disjoint meshes overlap: a phase costs its busiest rank's
sum over the phase's calls on that rank. Then one reallocation per view whose home weights changed
(each step: the actor's generation layout, a critic inference layout) and the EMA blend when on.
SFT and RM steps are one training call on a batch; a DPO step is the reference's log-probs, then
the actor's update. Iterative DPO samples and scores once per round, before the round's steps:
those calls (and the refill of the actor's generation layout) are priced per round.

Asynchronous PPO and GRPO (``async.max_staleness`` > 0) generate the next batch on actor_gen's own
ranks while the others score and train on the current one: a step is the steady state of the two
sides, max(generation, the rest) + one weight move into actor_gen's layout per ``sync_every``
steps (`AsyncSides`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import cached_property

from meshrl.engine.dataflow import (ACTOR_GEN, ROUND, TRAIN_CALLS, UPDATE, Call, async_overlap_error,
                                    dataflow)
from meshrl.engine.model.config import ConfigError, ModelConfig
from meshrl.engine.model.llama import check_layout_fits
from meshrl.parallel.layout import LayoutError, ParallelLayout, parse_ranks

from . import costmodel as cm
from meshrl.engine.runtime.config import (CallSpec, RunConfig, RunConfigError, check_call_ep,
                                          load_run_config)
from meshrl.engine.runtime.models import DTYPES, complete_calls, load_model_config, model_heads
from .plan_format import format_report
from .rates import RATES_ENV, Rates, load_rates



class PlanError(RunConfigError):
    """A layout that does not divide or does not fit; one line naming the call and why."""


@dataclass
class CallPlan:
    name: str
    source: str            # the config call whose layout this row uses
    spec: CallSpec
    model: str
    head: str
    kind: str              # gen | inf | train
    mcfg: ModelConfig
    layout: ParallelLayout
    dt: int
    home: bool             # runs in its model's home layout (else on a view)
    per_round: bool = False  # runs once per online round (iterative DPO), not per step
    phase: int = 0         # calls of one phase overlap where their meshes are disjoint
    memory: cm.Memory = field(default_factory=cm.Memory)  # this call's own bytes, worst rank
    resident: float = 0.0  # everything else on that GPU
    time: cm.CallTime | None = None

    @property
    def peak(self) -> float:
        return self.memory.total + self.resident

    @property
    def tag(self) -> str:
        return layout_tag(self.spec)

    @cached_property
    def shape(self) -> cm.CallShape:
        return cm.CallShape(self.mcfg, self.head, self.dt, self.spec.tp, self.spec.pp, self.spec.dp,
                            self.spec.ep)


def layout_tag(c: CallSpec) -> str:
    """tp·pp·dp, and ep when the call shares out experts."""
    return f"tp{c.tp}·pp{c.pp}·dp{c.dp}" + (f"·ep{c.ep}" if c.ep > 1 else "")


@dataclass(frozen=True)
class AsyncSides:
    """An asynchronous step's two sides, which run at the same time on disjoint ranks, in seconds:
    ``gen`` the generate phase (actor_gen on its own mesh), ``rest`` everything else a step does
    (the score, infer and train phases, the refills of the other views, the blends), ``sync`` one
    move of the actor's weights into actor_gen's layout, made every ``sync_every`` steps."""
    gen: float
    rest: float
    sync: float
    sync_every: int

    @property
    def step(self) -> float:
        """The steady state: the slower side sets the pace, and both wait for the weight move."""
        return max(self.gen, self.rest) + self.sync / self.sync_every

    def idle(self, side: float) -> float:
        """The fraction of a step that a side of ``side`` seconds waits for the other."""
        return 1 - side / self.step if self.step > 0 else 0.0


@dataclass
class PlanReport:
    cfg: RunConfig
    world: int
    rates: Rates
    workload: cm.Workload
    calls: list[CallPlan]
    placements: list[CallPlan]   # one per (model, layout): its home, then its views
    reallocs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fit_error: str | None = None
    round_workload: cm.Workload | None = None  # iterative DPO's sampling per round

    def workload_of(self, p: CallPlan) -> cm.Workload:
        return self.round_workload if p.per_round and self.round_workload else self.workload

    def phase_seconds(self, per_round: bool = False) -> dict[int, float]:
        """Each phase's time: its busiest rank's sum over the phase's calls on that rank (calls
        on disjoint meshes overlap; calls sharing a rank run one after the other there)."""
        load: dict[int, dict[int, float]] = {}
        for c in self.calls:
            if c.time is None or c.per_round != per_round:
                continue
            ranks = load.setdefault(c.phase, {})
            for r in c.layout.ranks:
                ranks[r] = ranks.get(r, 0.0) + c.time.seconds
        return {ph: max(ranks.values()) for ph, ranks in load.items()}

    @property
    def step_seconds(self) -> float:
        sides = self.async_sides()
        return self.synchronous_step_seconds if sides is None else sides.step

    @property
    def synchronous_step_seconds(self) -> float:
        """Every phase, refill and blend one after another (today's loop on these layouts)."""
        return (sum(self.phase_seconds().values())
                + sum(r["seconds"] * r["per_step"] for r in self.reallocs))

    @property
    def max_staleness(self) -> int:
        return self.cfg.async_.max_staleness

    def async_sides(self) -> AsyncSides | None:
        """Under ``async.max_staleness`` > 0, the step's two sides; None for the synchronous loop."""
        if self.max_staleness == 0:
            return None
        gen = {p.phase for p in self.calls if p.source == ACTOR_GEN}
        phases = self.phase_seconds()
        moves = [(r["seconds"] * r["per_step"], r["dst"] == ACTOR_GEN) for r in self.reallocs]
        return AsyncSides(gen=sum(t for ph, t in phases.items() if ph in gen),
                          rest=(sum(t for ph, t in phases.items() if ph not in gen)
                                + sum(t for t, to_gen in moves if not to_gen)),
                          sync=sum(t for t, to_gen in moves if to_gen),
                          sync_every=self.cfg.async_.sync_every)

    @property
    def round_seconds(self) -> float:
        """Iterative DPO: the sampling, scoring and refills before each round's steps."""
        return (sum(self.phase_seconds(per_round=True).values())
                + sum(r["seconds"] * r.get("per_round", 0) for r in self.reallocs))

    @property
    def steps_per_round(self) -> int:
        return steps_per_round(self.cfg)

    @property
    def objective_seconds(self) -> float:
        """What `--search` minimises: the step; for iterative DPO, a whole round (its sampling and
        refills, then its steps)."""
        if self.round_workload is None:
            return self.step_seconds
        return self.round_seconds + self.steps_per_round * self.step_seconds


def steps_per_round(cfg: RunConfig) -> int:
    """Iterative DPO: the most optimizer steps one round's pairs make."""
    d = cfg.dpo
    return d.epochs * max(1, d.prompts_per_round // d.batch_size)


def call_layout(cfg: RunConfig, name: str, c: CallSpec, world: int, mcfg: ModelConfig) -> ParallelLayout:
    """The virtual layout of call ``name`` (no process group), checked against the cluster and
    against its model's heads and layers; PlanError names the call otherwise."""
    top = max(parse_ranks(c.ranks))
    if top >= world:
        raise PlanError(f"calls.{name}.ranks reaches rank {top}, but the cluster has {world} GPUs "
                        f"({cfg.cluster.nodes} nodes × {cfg.cluster.gpus_per_node}): use ranks "
                        f"below {world} or enlarge the cluster")
    try:
        check_call_ep(name, c, dp=c.dp, mcfg=mcfg)
    except RunConfigError as e:
        raise PlanError(str(e)) from None
    try:
        layout = ParallelLayout(ranks=c.ranks, tp=c.tp, pp=c.pp, dp=c.dp, ep=c.ep, virtual=True,
                                world_size=world, name=f"calls.{name}")
    except LayoutError as e:
        raise PlanError(str(e)) from None
    try:
        check_layout_fits(mcfg, layout, name=f"calls.{name}")
    except ConfigError as e:
        raise PlanError(str(e)) from None
    return layout


def home_calls(calls: dict[str, CallSpec]) -> dict[str, str]:
    """{model: the call whose layout is its home}: its training call, else its first call by name."""
    home = {}
    for name in TRAIN_CALLS + tuple(sorted(calls)):
        if name in calls:
            home.setdefault(calls[name].model, name)
    return home


def dataflow_rows(cfg: RunConfig, calls: dict[str, CallSpec]) -> list[tuple[str, str, int]]:
    """(row, config call whose layout it runs in, phase) of every call the algorithm's dataflow
    runs in this config (`meshrl.engine.dataflow`), in the runtime's order."""
    return [(c.name, c.config_call, i) for i, c in dataflow(cfg.algorithm).rows(cfg, calls)]


def row_call(cfg: RunConfig, row: str) -> Call:
    """The dataflow's call of a row (a config call's own, for placements)."""
    return next(c for c in dataflow(cfg.algorithm).calls() if c.name == row)


def per_round_calls(cfg: RunConfig) -> set[str]:
    """Config calls that run once per online round (iterative DPO's sampling), not per step."""
    return {c.config_call for c in dataflow(cfg.algorithm).calls() if c.every == ROUND}


def blends(cfg: RunConfig, calls) -> list[tuple[str, str, str]]:
    """(dst call, src call, how often) of the weight blends this config runs: the EMA reference
    per actor update, iterative DPO's next reference per round."""
    return [(b.dst, b.src, b.every) for b in dataflow(cfg.algorithm).active_blends(cfg, calls)]


def call_plan(cfg: RunConfig, row: str, src: str, spec: CallSpec, *, head: str, mcfg: ModelConfig,
              layout: ParallelLayout, home: bool, phase: int = 0) -> CallPlan:
    call = row_call(cfg, row)
    return CallPlan(name=row, source=src, spec=spec, model=spec.model, head=head,
                    kind=call.kind, mcfg=mcfg, layout=layout,
                    dt=cm.DTYPE_BYTES[cfg.models[spec.model].dtype], home=home,
                    per_round=call.every == ROUND, phase=phase)


def _call_plans(cfg: RunConfig, world: int) -> tuple[list[CallPlan], list[CallPlan]]:
    """The dataflow's rows, and one placement per (model, layout): home first, then views."""
    calls = complete_calls(cfg, world)
    heads = model_heads(calls)
    configs, layouts = {}, {}
    for name, c in calls.items():
        if c.model not in configs:
            configs[c.model] = load_model_config(cfg.models[c.model], cfg.models)
        layouts[name] = call_layout(cfg, name, c, world, configs[c.model])
    overlap = async_overlap_error(cfg.async_.max_staleness, {n: lay.ranks for n, lay in layouts.items()})
    if overlap:
        raise PlanError(overlap)
    home_call = home_calls(calls)
    key = lambda n: (calls[n].model, calls[n].ranks, calls[n].tp, calls[n].pp, calls[n].dp,  # noqa: E731
                     calls[n].ep)

    def make(row, src, phase=0):
        c = calls[src]
        return call_plan(cfg, row, src, c, head=heads[c.model], mcfg=configs[c.model],
                         layout=layouts[src], home=key(src) == key(home_call[c.model]), phase=phase)
    placements = {}
    for name in [*home_call.values(), *sorted(calls)]:
        placements.setdefault(key(name), make(name, name))
    return [make(*row) for row in dataflow_rows(cfg, calls)], list(placements.values())


# ---- memory ------------------------------------------------------------------------------------

def _microbatches(p: CallPlan, wl: cm.Workload) -> int:
    per_update = wl.tokens / (wl.updates / wl.epochs if p.kind == "train" else 1) / p.spec.dp
    return max(1, math.ceil(per_update / p.spec.microbatch_tokens))


def own_memory(p: CallPlan, cfg: RunConfig, wl: cm.Workload, stage: int) -> cm.Memory:
    """This call's parameters (home or view), its training state, activations and KV cache on a
    rank of pipeline stage ``stage``."""
    s, m, spec = p.shape, cfg.models[p.model], p.spec
    P = cm.stage_params(s, stage)
    mem = cm.Memory(params=P * p.dt)
    if p.kind == "train":
        per_rep = wl.tokens * wl.epochs / wl.updates / spec.dp
        mem.grads = 4 * P
        mem.optim = 12 * cm.optimizer_params(s, stage, m.optim.zero1)
        mem.activations = cm.train_activations(
            s, stage, sp=m.sequence_parallel, ckpt=m.activation_checkpointing,
            mb_tokens=min(spec.microbatch_tokens, per_rep), microbatches=_microbatches(p, wl))
    elif p.kind == "gen":
        b = min(cfg.generation.batch_size, math.ceil(wl.sequences / spec.dp))
        mem.kv = cm.kv_cache_bytes(s, stage, batch=b, context=wl.prompt_len + wl.decode_steps)
        mem.activations = cm.forward_activations(s, b * wl.prompt_len)
    else:
        mem.activations = cm.forward_activations(s, min(spec.microbatch_tokens, wl.tokens / spec.dp))
    return mem


def _static_bytes(placements: list[CallPlan], cfg: RunConfig, kind: str, rank: int) -> float:
    """Parameters and training state on ``rank`` while a call of ``kind`` runs: every model's home
    state (a trained model's fp32 grads and optimizer; the optimizer on the host during rollouts
    when offload_when_idle) and every view's parameters, which the runtime keeps allocated."""
    trained = {p.model for p in placements if p.source in TRAIN_CALLS}
    total = 0.0
    for p in placements:
        coord = p.layout.coord_of(rank)
        if coord is None:
            continue
        P = cm.stage_params(p.shape, coord.pp)
        total += P * p.dt
        if p.home and p.model in trained:
            m = cfg.models[p.model]
            total += 4 * P
            if not (m.offload_when_idle and kind != "train"):
                total += 12 * cm.optimizer_params(p.shape, coord.pp, m.optim.zero1)
    return total


def _memory(report: PlanReport):
    """Fill every row's own memory and what else is resident, at its worst rank."""
    cfg, mem_gb = report.cfg, report.cfg.cluster.gpu_mem_gb
    for p in report.calls:
        best = None
        for r in p.layout.ranks:
            own = own_memory(p, cfg, report.workload_of(p), p.layout.coord_of(r).pp)
            static = _static_bytes(report.placements, cfg, p.kind, r)
            resident = static - own.params - own.grads - own.optim
            if best is None or own.total + resident > best[0].total + best[1]:
                best = (own, resident)
        p.memory, p.resident = best
    # blame the over-budget call that brings the most of its own: the others only share its GPUs
    over = [p for p in report.calls if p.peak > mem_gb * cm.GB]
    if over:
        report.fit_error = _fit_message(max(over, key=lambda p: p.memory.total), cfg, mem_gb)


def _fit_message(p: CallPlan, cfg: RunConfig, mem_gb: float) -> str:
    m, spec = p.memory, cfg.models[p.model]
    parts = [("params", m.params), ("grads", m.grads), ("optimizer", m.optim),
             ("activations", m.activations), ("KV cache", m.kv), ("other resident", p.resident)]
    detail = " + ".join(f"{k} {v / cm.GB:.1f}" for k, v in parts if v)
    spread = "raise tp, pp or ep" if p.mcfg.is_moe else "raise tp or pp"  # ep: experts shared out
    if p.resident > m.total:
        fix = "other models hold most of it: raise their tp or pp, or set offload_when_idle"
    elif p.kind == "gen" and m.kv > m.params:
        fix = f"lower generation.batch_size, or {spread}"
    elif p.kind == "train" and not spec.activation_checkpointing:
        fix = f"{spread}, or enable activation checkpointing"
    elif p.kind == "train":
        fix = f"{spread}, or lower microbatch_tokens"
    else:
        fix = spread
    return (f"calls.{p.name}: {p.peak / cm.GB:.1f} GB per GPU > {mem_gb:g} GB ({detail}): {fix}")


def check_fit(report: PlanReport):
    if report.fit_error:
        raise PlanError(report.fit_error)


# ---- reallocation ------------------------------------------------------------------------------

def _reallocs(report: PlanReport) -> list[dict]:
    """One move per view per refresh (home weights change every step for trained models; a frozen
    model's view is filled once), and the EMA blend per actor update."""
    cfg, r = report.cfg, report.rates
    intra, inter = cm.link_bandwidths(cfg.cluster, r)
    kw = dict(gpus_per_node=cfg.cluster.gpus_per_node, intra_bw=intra, inter_bw=inter,
              local_bw=r.local_copy_gbps * 1e9, latency=r.latency_s)
    homes = {p.model: p for p in report.placements if p.home}
    trained = {p.model for p in report.placements if p.source in TRAIN_CALLS}
    calls = {p.source for p in report.placements}
    pairs = [(_model_of(report, dst), _model_of(report, src), every)
             for dst, src, every in blends(cfg, calls)]
    blended = {dst for dst, _, every in pairs if every == UPDATE}  # its views refill every step
    per_round = per_round_calls(cfg)
    out = []
    for v in report.placements:
        if v.home:
            continue
        h = homes[v.model]
        cost = cm.realloc_cost(h.mcfg, h.head, DTYPES[cfg.models[v.model].dtype], h.layout, v.layout, **kw)
        fresh = v.model in trained or v.model in blended
        if v.source in per_round:
            # refilled once per online round; offline, the view serves evaluation only
            per_step, per_round_n = 0, int(fresh and report.round_workload is not None)
        else:
            per_step, per_round_n = int(fresh), 0
        out.append({"model": v.model, "src": h.source, "dst": v.source, "per_step": per_step,
                    "per_round": per_round_n, **cost})
    for dst, src, every in pairs:
        if dst == src:
            continue
        a, b = homes[src], homes[dst]
        cost = cm.realloc_cost(a.mcfg, a.head, DTYPES[cfg.models[src].dtype], a.layout, b.layout, **kw)
        if every == UPDATE:  # the EMA reference trails the actor after each update
            out.append({"model": f"{dst}←{src} (EMA)", "src": a.source, "dst": b.source,
                        "per_step": report.workload.updates, **cost})
        elif report.round_workload is not None:  # the round's result becomes the next reference
            out.append({"model": f"{dst}←{src}", "src": a.source, "dst": b.source, "per_step": 0,
                        "per_round": 1, **cost})
    return out


def _model_of(report: PlanReport, call: str) -> str | None:
    return next((p.model for p in report.placements if p.source == call), None)


# ---- time --------------------------------------------------------------------------------------

def call_time(p: CallPlan, cfg: RunConfig, r: Rates, wl: cm.Workload) -> cm.CallTime:
    s, links, m = p.spec, cm.group_links(p.layout, cfg.cluster, r), cfg.models[p.model]
    if p.kind == "gen":
        return cm.generate_time(p.shape, prompts=wl.generated, prompt_len=wl.prompt_len,
                                new_tokens=wl.response_len, decode_steps=wl.decode_steps,
                                batch_size=cfg.generation.batch_size, r=r, links=links)
    if p.kind == "train":
        return cm.train_time(p.shape, tokens=wl.tokens * wl.epochs, mb_tokens=s.microbatch_tokens,
                             seq_len=wl.seq_len, updates=wl.updates, zero1=m.optim.zero1,
                             ckpt=m.activation_checkpointing, r=r, links=links)
    return cm.forward_time(p.shape, tokens=wl.tokens, mb_tokens=s.microbatch_tokens,
                           seq_len=wl.seq_len, r=r, links=links)


def _times(report: PlanReport):
    for p in report.calls:
        if p.per_round and report.round_workload is None:
            continue  # offline DPO: the generation layout serves evaluation only
        p.time = call_time(p, report.cfg, report.rates, report.workload_of(p))


def check_priceable(cfg: RunConfig):
    """What the planner cannot price yet: iterative DPO's rounds sampled asynchronously (the plan
    prices a round's sampling before its steps)."""
    if cfg.async_.max_staleness and cfg.algorithm == "dpo":
        raise PlanError(f"async.max_staleness={cfg.async_.max_staleness} with iterative dpo: meshrl plan "
                        "prices a round's sampling before its steps, not beside them; plan (or search) "
                        "it with async.max_staleness=0, and lay out calls by hand for the async run")


def plan_config(cfg: RunConfig, *, world: int | None = None, device: str | None = None,
                rates_path: str | None = None, rates: Rates | None = None,
                prompt_len=None, response_len=None, decode_steps=None,
                realloc: bool = True) -> PlanReport:
    """The whole dry run. Layouts that do not divide raise PlanError; one that does not fit sets
    ``fit_error`` (see `check_fit`) and skips the timing."""
    check_priceable(cfg)
    cfg = copy.deepcopy(cfg)  # complete_calls fills ranks and dp in place
    cl = cfg.cluster
    expected = cl.nodes * cl.gpus_per_node
    if world is not None and world != expected:
        raise PlanError(f"cluster: nodes × gpus_per_node = {cl.nodes} × {cl.gpus_per_node} = "
                        f"{expected}, but the run has {world} ranks: set cluster.nodes and "
                        "cluster.gpus_per_node to match")
    rates = rates or load_rates(device or cfg.cluster.device, rates_path)
    calls, placements = _call_plans(cfg, expected)
    wl = cm.workload_of(cfg, prompt_len, response_len, decode_steps)
    report = PlanReport(cfg, expected, rates, wl, calls, placements)
    if cfg.algorithm == "dpo" and cfg.dpo.rounds:
        report.round_workload = cm.online_round_workload(cfg, wl)
    _memory(report)
    if report.fit_error is None:
        _times(report)
        if realloc:
            report.reallocs = _reallocs(report)
    return report


def add_arguments(p):
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides (omegaconf dotlist)")
    p.add_argument("--device", help="whose rates: a device or alias in the rates file (h100, cpu); "
                   "default: the config's cluster.device (h100)")
    p.add_argument("--rates", help=f"rates file (default benchmarks/rates.json or ${RATES_ENV})")
    p.add_argument("--prompt-len", type=float, help="mean prompt tokens (default data.max_prompt_len)")
    p.add_argument("--response-len", type=float,
                   help="mean response tokens (default generation.max_new_tokens; sft, rm, dpo: "
                        "data.max_len minus the prompt)")
    from .search import add_arguments as search_arguments
    search_arguments(p)


def run(args) -> int:
    from .search import check_arguments, run_search
    check_arguments(args)
    cfg = load_run_config(args.config, args.overrides)
    if args.search:
        return run_search(args, cfg)
    report = plan_config(cfg, device=args.device, rates_path=args.rates, prompt_len=args.prompt_len,
                         response_len=args.response_len)
    print(format_report(report))
    check_fit(report)
    return 0
