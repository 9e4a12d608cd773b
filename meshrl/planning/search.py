"""`meshrl plan CONFIG --search`: every call's mesh, tp, pp, dp and microbatch size, chosen to
minimise the estimate `meshrl plan` prints for them, within its memory check; exactly.

What is searched, for each call (all of them, or those named by ``--search-calls``; the others keep
the config's layout):

- a mesh: the whole cluster, a power-of-two number of whole nodes at a node-aligned offset, or a
  power-of-two slice of one node at an aligned offset;
- tp: a power of two up to a node's GPUs (and the mesh) that divides the model's heads; pp: a power
  of two up to the model's layers; dp: the mesh's GPUs / (tp·pp);
- ``microbatch_tokens`` from `MICROBATCH_TOKENS` and the config's own value, for calls that run
  microbatches (generation has its own ``generation.batch_size``).

What is minimised: `PlanReport.objective_seconds` for those layouts, the very cost model of
`meshrl plan` — phases one after another (a phase's calls overlap where their meshes are
disjoint), the reallocations that refill the views of changing weights, and the EMA blend; for
iterative DPO a whole round. A call on fewer GPUs is never faster here, but it keeps its weights
off the other GPUs, which can let another call take a faster layout. Under ``async.max_staleness``
> 0 only plans whose actor_gen shares no rank with another call are candidates, and the step is
the steady state max(generation, the rest) + weight move / sync_every (`plan.AsyncSides`).

How: depth-first branch and bound over the calls. The calls that hold a model's home layout come
first, so the weights placed along a branch only grow and the memory of the calls chosen so far is
a lower bound of their final memory. A branch is cut when a chosen call's peak on some GPU, with
the weights placed so far, exceeds ``cluster.gpu_mem_gb``, or when its cost so far plus every
remaining call's fastest standalone time cannot beat the k-th best plan found. Under async the
same per-phase bounds are summed per side, max(generation's, the rest's with its moves) + the
weight moves into actor_gen so far, and while actor_gen is still to come its side is at least the
fastest actor_gen layout whose mesh avoids every rank taken so far: each term never exceeds its
final value, so neither does the bound (admissible; the result stays exact). Within one (call,
layout), microbatch sizes no better in time and no smaller in memory than another are dropped
(same layout, same weights: exact). Candidates are tried fastest first with ties broken by the
layout, so the search is deterministic. The result is re-priced by `plan_config`.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

from meshrl.engine.dataflow import ACTOR_GEN, GENERATE, TRAIN_CALLS, UPDATE, async_overlap_error
from meshrl.engine.model.config import ModelConfig
from meshrl.engine.runtime.config import CallSpec, RunConfig, RunConfigError
from meshrl.engine.runtime.models import DTYPES, complete_calls, load_model_config, model_heads
from meshrl.parallel.layout import format_ranks, parse_ranks

from . import costmodel as cm
from .plan import (CallPlan, PlanError, PlanReport, blends, call_layout, call_plan, call_time,
                   check_priceable, dataflow_rows, home_calls, own_memory, per_round_calls,
                   plan_config, row_call, steps_per_round)
from .rates import Rates, load_rates

MICROBATCH_TOKENS = (1024, 2048, 4096, 8192, 16384)
DEFAULT_BUDGET = 2_000_000  # partial plans visited before the search stops with what it has


@dataclass(frozen=True, order=True)
class Choice:
    """One call's layout: its ranks, tp, pp (dp is the rest), microbatch tokens and ep (MoE)."""
    ranks: tuple[int, ...]
    tp: int
    pp: int
    mb: int
    ep: int = 1

    @property
    def dp(self) -> int:
        return len(self.ranks) // (self.tp * self.pp)

    @property
    def layout_key(self) -> tuple:
        return self.ranks, self.tp, self.pp, self.ep

    @property
    def ranks_text(self) -> str:
        return format_ranks(self.ranks)

    def spec(self, model: str) -> CallSpec:
        return CallSpec(model=model, ranks=self.ranks_text, tp=self.tp, pp=self.pp, dp=self.dp,
                        ep=self.ep, microbatch_tokens=self.mb)

    def describe(self) -> str:
        ep = f"·ep{self.ep}" if self.ep > 1 else ""
        return f"ranks {self.ranks_text} tp{self.tp}·pp{self.pp}·dp{self.dp}{ep} mb{self.mb}"

    def as_dict(self, model: str) -> dict:
        """The call as a config writes it (ep only when it shares out experts)."""
        out = {"model": model, "ranks": self.ranks_text, "tp": self.tp, "pp": self.pp, "dp": self.dp}
        return {**out, **({"ep": self.ep} if self.ep > 1 else {}), "microbatch_tokens": self.mb}


@dataclass
class Candidate:
    call: str
    choice: Choice
    rows: list[CallPlan]          # the dataflow rows that run in this call's layout, timed
    cost: float                   # their time, weighted as in the objective
    phases: dict[int, float]      # that time by phase
    idx: slice | np.ndarray       # the layout's ranks (a slice when contiguous: faster to index)
    extra: list[np.ndarray]       # per row: activations + KV cache per rank of idx
    kinds: list[str]


@dataclass
class Plan:
    seconds: float
    choices: dict[str, Choice]


@dataclass
class SearchResult:
    cfg: RunConfig
    plans: list[Plan]             # best first
    complete: bool                # False: stopped at the budget, best found so far
    visited: int
    candidates: dict[str, int]    # per call, after memory and dominance pruning
    seconds: float
    report: PlanReport | None = None  # the best plan priced by plan_config
    config_report: PlanReport | None = None  # the config's own layouts, when they divide and fit
    notes: list[str] = field(default_factory=list)
    calls: dict[str, CallSpec] = field(default_factory=dict)  # every call, completed for the cluster
    no_fit: str | None = None  # when no plan fits: the one-line reason (`no_fit_message`)


class SearchError(RunConfigError):
    """No plan fits, or an option that contradicts itself; one line naming what to change."""


def _powers_of_two(upto: int) -> list[int]:
    out, x = [], 1
    while x <= upto:
        out.append(x)
        x *= 2
    return out


def meshes(world: int, gpus_per_node: int) -> list[tuple[int, ...]]:
    """The whole cluster, power-of-two counts of whole nodes at aligned offsets, and power-of-two
    slices of a node at aligned offsets."""
    nodes = world // gpus_per_node
    out = [tuple(range(world))]
    for n in _powers_of_two(nodes):
        for lo in range(0, nodes - n + 1, n):
            out.append(tuple(range(lo * gpus_per_node, (lo + n) * gpus_per_node)))
    for size in _powers_of_two(gpus_per_node // 2):
        for node in range(nodes):
            for lo in range(node * gpus_per_node, (node + 1) * gpus_per_node - size + 1, size):
                out.append(tuple(range(lo, lo + size)))
    return list(dict.fromkeys(out))


class Search:
    """The space of one config on its cluster, its candidates priced once, and the branch and bound."""

    def __init__(self, cfg: RunConfig, *, free: list[str] | None = None, rates: Rates | None = None,
                 microbatch_tokens=MICROBATCH_TOKENS, top: int = 3, budget: int = DEFAULT_BUDGET,
                 prompt_len=None, response_len=None, decode_steps=None):
        self.cfg = cfg = copy.deepcopy(cfg)
        cl = cfg.cluster
        self.world, self.gpn = cl.nodes * cl.gpus_per_node, cl.gpus_per_node
        self.rates = rates or load_rates(cl.device)
        self.budget_bytes = cl.gpu_mem_gb * cm.GB
        self.top, self.node_budget = top, budget
        self.lens = dict(prompt_len=prompt_len, response_len=response_len, decode_steps=decode_steps)
        self.calls = complete_calls(cfg, self.world)
        unknown = sorted(set(free or ()) - set(self.calls))
        if unknown:
            raise SearchError(f"--search-calls {','.join(unknown)}: {cfg.algorithm} runs no such call; "
                              f"its calls are {', '.join(sorted(self.calls))}")
        self.free = set(self.calls) if free is None else set(free)
        check_priceable(cfg)
        self.staleness, self.sync_every = cfg.async_.max_staleness, cfg.async_.sync_every
        self.blocked = self._async_blocked()
        self.heads = model_heads(self.calls)
        self.mcfg: dict[str, ModelConfig] = {}
        for c in self.calls.values():
            if c.model not in self.mcfg:
                self.mcfg[c.model] = load_model_config(cfg.models[c.model], cfg.models)
        self.home_call = home_calls(self.calls)
        self.rows = dataflow_rows(cfg, self.calls)
        self.trained = {self.calls[n].model for n in TRAIN_CALLS if n in self.calls}
        self.wl = cm.workload_of(cfg, **self.lens)
        self.round_wl = (cm.online_round_workload(cfg, self.wl)
                         if cfg.algorithm == "dpo" and cfg.dpo.rounds else None)
        self.weight = steps_per_round(cfg) if self.round_wl else 1  # per-step seconds in a round
        self.order = list(dict.fromkeys([*self.home_call.values(), *sorted(self.calls)]))
        self.microbatch_tokens = tuple(microbatch_tokens)
        self._layouts, self._static, self._realloc, self._floor = {}, {}, {}, {}
        intra, inter = cm.link_bandwidths(cl, self.rates)
        self._realloc_kw = dict(gpus_per_node=cl.gpus_per_node, intra_bw=intra, inter_bw=inter,
                                local_bw=self.rates.local_copy_gbps * 1e9, latency=self.rates.latency_s,
                                spec_cache={})
        self.candidates = {name: self._candidates(name) for name in self.order}

    def _async_blocked(self) -> dict[str, set[int]]:
        """Under async, the ranks each free call may not use: the fixed calls' on the other side of
        actor_gen (fixed calls that overlap it are the config's error)."""
        if not self.staleness:
            return {}
        fixed = {n: parse_ranks(c.ranks) for n, c in self.calls.items() if n not in self.free}
        overlap = async_overlap_error(self.staleness, fixed)
        if overlap:
            raise SearchError(overlap)
        gen = set(fixed.get(ACTOR_GEN, ()))
        others = {r for n, ranks in fixed.items() if n != ACTOR_GEN for r in ranks}
        if ACTOR_GEN in self.free and len(others) == self.world:
            raise SearchError(f"async.max_staleness={self.staleness} overlaps generation with training, "
                              f"so calls.{ACTOR_GEN} needs ranks no other call uses, but the calls kept "
                              f"fixed ({', '.join(sorted(n for n in fixed if n != ACTOR_GEN))}) use every "
                              "rank: search them too (--search-calls) or give them fewer ranks")
        return {n: others if n == ACTOR_GEN else gen for n in self.free}

    # ---- candidates -----------------------------------------------------------------------------
    def _choices(self, name: str) -> list[Choice]:
        c = self.calls[name]
        takes_mb = any(src == name and row_call(self.cfg, row).kind != GENERATE for row, src, _ in self.rows)
        if name not in self.free:
            return [Choice(tuple(int(r) for r in c.ranks.split(",")), c.tp, c.pp, c.microbatch_tokens,
                           c.ep)]
        mbs = sorted({*self.microbatch_tokens, c.microbatch_tokens}) if takes_mb else [c.microbatch_tokens]
        layers = self.mcfg[c.model].num_hidden_layers
        experts = self.mcfg[c.model].num_experts
        out = []
        for ranks in meshes(self.world, self.gpn):
            for tp in _powers_of_two(min(self.gpn, len(ranks))):
                for pp in _powers_of_two(min(layers, len(ranks) // tp)):
                    if len(ranks) % (tp * pp) == 0:
                        dp = len(ranks) // (tp * pp)
                        # MoE: ep a power of two dividing dp and the experts (dense: 1)
                        eps = [e for e in _powers_of_two(dp) if experts % e == 0 and dp % e == 0]
                        out += [Choice(ranks, tp, pp, mb, ep) for ep in (eps if experts else [1])
                                for mb in mbs]
        return out

    def _layout(self, name: str, ch: Choice):
        key = (self.calls[name].model, ch.layout_key)
        if key not in self._layouts:
            try:
                self._layouts[key] = call_layout(self.cfg, name, ch.spec(key[0]), self.world,
                                                 self.mcfg[key[0]])
            except PlanError:
                self._layouts[key] = None
        return self._layouts[key]

    def _candidates(self, name: str) -> list[Candidate]:
        model = self.calls[name].model
        home = name == self.home_call[model]
        out = []
        for ch in self._choices(name):
            if name in self.free and self.staleness and (
                    len(ch.ranks) == self.world or not self.blocked[name].isdisjoint(ch.ranks)):
                continue  # async: the whole cluster always overlaps actor_gen, or actor_gen the rest
            layout = self._layout(name, ch)
            if layout is None:
                if name not in self.free:  # the config's own layout: say why it cannot be
                    call_layout(self.cfg, name, ch.spec(model), self.world, self.mcfg[model])
                continue
            cand = self._candidate(name, ch, layout, home)
            # its own weights alone are a lower bound of what shares its GPUs
            if name not in self.free or self._fits([cand], self._placement(model, ch, layout, home)):
                out.append(cand)
        out = _drop_dominated(out)
        return sorted(out, key=lambda c: (c.cost, c.choice))

    def _candidate(self, name: str, ch: Choice, layout, home: bool) -> Candidate:
        """Call ``name`` in layout ``ch``: its dataflow rows timed, and what each needs per rank
        beyond the resident weights."""
        model = self.calls[name].model
        stage = np.array([layout.coord_of(r).pp for r in layout.ranks])
        rows, extra, kinds, cost, phases = [], [], [], 0.0, {}
        for row, src, phase in self.rows:
            if src != name:
                continue
            p = call_plan(self.cfg, row, src, ch.spec(model), head=self.heads[model],
                          mcfg=self.mcfg[model], layout=layout, home=home, phase=phase)
            wl = self.round_wl if p.per_round and self.round_wl else self.wl
            own = [_own_extra(p, self.cfg, wl, s) for s in range(ch.pp)]
            extra.append(np.array(own)[stage])
            kinds.append(p.kind)
            if p.per_round and self.round_wl is None:
                continue  # offline DPO: the generation layout serves evaluation only
            p.time = call_time(p, self.cfg, self.rates, wl)
            t = p.time.seconds * (1 if p.per_round else self.weight)
            cost += t
            phases[phase] = phases.get(phase, 0.0) + t
            rows.append(p)
        return Candidate(name, ch, rows, cost, phases, _index(layout.ranks), extra, kinds)

    def _placement(self, model: str, ch: Choice, layout, home: bool):
        """Bytes per rank (world-long arrays) that this model's weights in this layout keep
        resident: params (+ fp32 grads at home if trained), the optimizer state never offloaded,
        and the optimizer state parked on the host outside training (offload_when_idle)."""
        key = (model, ch.layout_key, home)
        if key not in self._static:
            m, mc = self.cfg.models[model], self.mcfg[model]
            base, fixed, off = (np.zeros(self.world) for _ in range(3))
            shape = cm.CallShape(mc, self.heads[model], cm.DTYPE_BYTES[m.dtype], ch.tp, ch.pp, ch.dp,
                                 ch.ep)
            for r in layout.ranks:
                stage = layout.coord_of(r).pp
                P = cm.stage_params(shape, stage)
                base[r] = P * shape.dt
                if home and model in self.trained:
                    base[r] += 4 * P
                    (off if m.offload_when_idle else fixed)[r] = 12 * cm.optimizer_params(
                        shape, stage, m.optim.zero1)
            self._static[key] = (base, fixed, off)
        return self._static[key]

    def _realloc_seconds(self, model: str, src: Choice, dst: Choice) -> float:
        key = (model, src.layout_key, dst.layout_key)
        if key not in self._realloc:
            a, b = self._layouts[(model, src.layout_key)], self._layouts[(model, dst.layout_key)]
            self._realloc[key] = cm.realloc_cost(self.mcfg[model], self.heads[model],
                                                 DTYPES[self.cfg.models[model].dtype], a, b,
                                                 **self._realloc_kw)["seconds"]
        return self._realloc[key]

    def _realloc_floor(self, model: str, src: Choice, dst: Choice) -> float:
        """A lower bound of `_realloc_seconds` at a tenth of its price (costmodel); the exact
        figure when that is known already."""
        key = (model, src.layout_key, dst.layout_key)
        if key in self._realloc:
            return self._realloc[key]
        if key not in self._floor:
            a, b = self._layouts[(model, src.layout_key)], self._layouts[(model, dst.layout_key)]
            self._floor[key] = cm.realloc_floor_seconds(
                self.mcfg[model], self.heads[model], DTYPES[self.cfg.models[model].dtype], a, b,
                gpus_per_node=self.gpn, inter_bw=self._realloc_kw["inter_bw"],
                spec_cache=self._realloc_kw["spec_cache"])
        return self._floor[key]

    def _fits(self, picked: list[Candidate], static) -> bool:
        """Every picked call's rows within gpu_mem_gb on every rank, given the resident bytes."""
        return _peak(picked, static, stop_above=self.budget_bytes) <= self.budget_bytes

    def _gen_floor(self, tables: dict, gen_ph: list[int]):
        """Async: actor_gen's place in the order, and ``floor(name, taken)``: per mesh of call
        ``name``, the least generate-phase time of an actor_gen candidate whose mesh avoids both
        that mesh and the ranks ``taken`` by the calls chosen so far (inf where none does) — a
        lower bound of the generation side while actor_gen is still to be chosen."""
        if ACTOR_GEN not in self.order or not self.candidates[ACTOR_GEN]:
            return -1, None
        gt, ranks = tables[ACTOR_GEN], np.arange(self.world)
        fastest = np.full(len(gt.meshes), np.inf)
        for c, m in zip(self.candidates[ACTOR_GEN], gt.mesh_of):
            fastest[m] = min(fastest[m], sum(c.phases.get(ph, 0.0) for ph in gen_ph))
        gen_sets = [set(ranks[ix].tolist()) for ix in gt.meshes]
        apart = {n: np.array([[g.isdisjoint(ranks[ix].tolist()) for g in gen_sets] for ix in t.meshes],
                             dtype=bool).reshape(len(t.meshes), len(gen_sets))
                 for n, t in tables.items()}

        def floor(name: str, taken: np.ndarray) -> np.ndarray:
            clear = gt.mesh_loads(taken) == 0
            return np.where(apart[name] & clear, fastest, np.inf).min(axis=1, initial=np.inf)
        return self.order.index(ACTOR_GEN), floor

    # ---- branch and bound -----------------------------------------------------------------------
    def run(self) -> SearchResult:
        t0 = time.perf_counter()
        order, cands, W = self.order, self.candidates, self.weight
        phases = sorted({ph for _, _, ph in self.rows})
        # lower bounds of what the calls from i on add to each phase: the largest of their
        # fastest standalone times there (a phase costs at least its slowest call)
        rest = [dict.fromkeys(phases, 0.0) for _ in range(len(order) + 1)]
        for i in range(len(order) - 1, -1, -1):
            rest[i] = dict(rest[i + 1])
            for ph in phases:
                lo = min((c.phases.get(ph, 0.0) for c in cands[order[i]]), default=math.inf)
                rest[i][ph] = max(rest[i][ph], lo)
        # the EMA blend (per actor update) and iterative DPO's reference refill (per round) move
        # the actor's home weights into the reference's: priced once both homes are chosen
        moves_of = blends(self.cfg, self.calls)
        ema = any(every == UPDATE for *_, every in moves_of)
        actor, ref = ((self.calls[moves_of[0][1]].model, self.calls[moves_of[0][0]].model) if moves_of
                      else (None, None))
        per_round = per_round_calls(self.cfg)
        pair = ((self.home_call[actor], self.home_call[ref]) if actor and ref else None)
        pair_cost = (self.wl.updates * W if ema else 0) + (1 if self.round_wl and actor != ref else 0)
        pair_at = max(order.index(pair[0]), order.index(pair[1])) if pair and pair_cost else -1
        call_phases = {n: {ph for _, src, ph in self.rows if src == n} for n in order}
        tables = {n: _CostTable(cands[n], sorted(call_phases[n])) for n in order}
        # async: the generation side's phases, the rest's, and for each call the side its phases
        # are all on (None: both, or none), whose floor bounds its candidates sorted by cost
        A, k_sync = self.staleness > 0, self.sync_every
        gen_ph = sorted({ph for _, src, ph in self.rows if src == ACTOR_GEN}) if A else []
        rest_ph = [ph for ph in phases if ph not in gen_ph]
        side = {n: ("gen" if call_phases[n] <= set(gen_ph) else "rest" if not call_phases[n] & set(gen_ph)
                    else None) if call_phases[n] else None for n in order}
        gen_cols = {n: np.array([ph in gen_ph for ph in tables[n].phases], dtype=bool) for n in order}
        gen_at, gen_floor = self._gen_floor(tables, gen_ph) if A else (-1, None)
        best: list[Plan] = []
        state = {"visited": 0, "stopped": False}

        def bound() -> float:
            return best[-1].seconds if len(best) >= self.top else math.inf

        def dfs(i: int, moves: float, loads: dict, peaks: dict, chosen: dict, placed: frozenset,
                static, picked: list, sync: float = 0.0, occ=None):
            """``moves``: reallocation seconds so far (async: the rest's); ``loads[phase]``: seconds
            per rank; ``peaks[phase]``: its busiest rank's. Async only: ``sync`` the weight moves
            into actor_gen per step; ``occ`` 1 on (actor_gen's ranks, the other calls' ranks)."""
            if i == len(order):
                if A:
                    cost = (max(sum(peaks[ph] for ph in gen_ph), moves + sum(peaks[ph] for ph in rest_ph))
                            + sync)
                else:
                    cost = moves + sum(peaks.values())
                # plans of one cost are nearly always mirror images (another node, another slice
                # of a node): keep the first in layout order as the representative of its cost
                plan = Plan(cost, dict(chosen))
                same = next((p for p in best if math.isclose(p.seconds, cost, rel_tol=1e-12)), None)
                if same is not None:
                    if sorted(plan.choices.items()) >= sorted(same.choices.items()):
                        return
                    best.remove(same)
                best.append(plan)
                best.sort(key=lambda p: (p.seconds, sorted(p.choices.items())))
                del best[self.top:]
                return
            name = order[i]
            model = self.calls[name].model
            home = name == self.home_call[model]
            later = rest[i + 1]
            base = {ph: max(peaks[ph], later[ph]) for ph in phases}
            if A:  # each side's floor; a call's candidates lie on one side (else no cut by cost)
                g0 = sum(base[ph] for ph in gen_ph)
                r0 = moves + sum(base[ph] for ph in rest_ph)
                floor = (g0 if side[name] == "gen" else r0) + sync
            else:
                floor = sum(base.values()) + moves
            spare = sum(base[ph] for ph in call_phases[name])
            # each phase with a candidate costs at least its own time there, so the plan at least
            # floor + Σ max(0, t − base) ≥ floor + cost − Σ base over the call's phases (the same
            # for all its candidates): sorted by cost, the first over the bound ends the list
            cs, table = cands[name], tables[name]
            B = bound()
            end = len(cs)
            if math.isfinite(B) and (not A or side[name] is not None):
                end = int(np.searchsorted(table.cost, B - floor + spare, side="left"))
            cols = [base[ph] for ph in table.phases]
            if A:
                over = np.maximum(table.times[:end] - np.array(cols), 0.0)
                gc = gen_cols[name]
                alone = np.maximum(g0 + over[:, gc].sum(axis=1), r0 + over[:, ~gc].sum(axis=1)) + sync
            else:
                alone = floor + np.maximum(table.times[:end] - np.array(cols), 0.0).sum(axis=1) \
                    if table.phases else np.full(end, floor)
            js = np.flatnonzero(alone < B)
            if A and len(js):  # actor_gen's ranks are its own: drop meshes that would share one
                block = occ[1] if name == ACTOR_GEN else occ[0]
                js = js[table.mesh_loads(block)[table.mesh_of[js]] == 0]
            if not len(js):
                return
            # every surviving candidate's new phase peaks and lower bound at once: a phase's load
            # on a candidate's mesh is one range maximum per distinct mesh (np.maximum.reduceat)
            mesh = table.mesh_of[js]
            grown = {}
            for k, ph in enumerate(table.phases):
                on_mesh = table.mesh_loads(loads[ph])
                grown[ph] = np.maximum(peaks[ph], on_mesh[mesh] + table.times[js, k])
            if A:  # each side's lower bound per candidate
                side_lo = [np.zeros(len(js)), np.full(len(js), moves)]
                for ph in phases:
                    side_lo[ph not in gen_ph] += (np.maximum(grown[ph], later[ph]) if ph in grown
                                                  else max(peaks[ph], later[ph]))
                if i < gen_at:  # actor_gen, still to come, must avoid these ranks and the candidate's
                    side_lo[0] = np.maximum(side_lo[0], gen_floor(name, occ[1])[table.mesh_of[js]])
                lowers = np.maximum(*side_lo) + sync
            else:
                total = 0
                for ph in phases:  # summed in phase order, as the scalar form would
                    total = total + (np.maximum(grown[ph], later[ph]) if ph in grown
                                     else max(peaks[ph], later[ph]))
                lowers = moves + total
            for pos, j in enumerate(js.tolist()):
                if state["stopped"]:
                    return
                lower = float(lowers[pos])
                if alone[j] >= B or lower >= B:  # the bound fell since the filter
                    continue
                cand = cs[j]
                new_peaks = dict(peaks)
                for ph in grown:
                    new_peaks[ph] = float(grown[ph][pos])
                state["visited"] += 1
                if state["visited"] > self.node_budget:
                    state["stopped"] = True
                    return
                ch, add = cand.choice, 0.0
                lkey = (model, ch.layout_key)
                new_static, new_placed, refill = static, placed, 0
                if lkey not in placed:  # a home, or a view with weights of its own
                    pb, pf, po = self._placement(model, ch, self._layouts[lkey], home)
                    new_static = (static[0] + pb, static[1] + pf, static[2] + po)
                    new_placed = placed | {lkey}
                    if not home:  # filled from home whenever the home weights changed
                        fresh = model in self.trained or (ema and model == ref)
                        refill = (int(fresh and self.round_wl is not None) if name in per_round
                                  else int(fresh) * W)
                rows = picked + [cand]
                # new weights can crowd every call chosen so far; else only cand itself is new
                if not self._fits(rows if new_static is not static else [cand], new_static):
                    continue
                # reallocations are priced last, planning one being the search's costliest step,
                # and only where their cheap lower bound leaves the plan in the running
                new_chosen = {**chosen, name: ch}
                moved = []
                if refill:
                    moved.append((refill, model, chosen[self.home_call[model]], ch))
                if i == pair_at:
                    moved.append((pair_cost, actor, new_chosen[pair[0]], new_chosen[pair[1]]))
                new_sync, new_occ = sync, occ
                if A:
                    # actor_gen's refill is the weight move, made once per sync_every steps; the
                    # other moves join the rest's side
                    lo_g, lo_r = float(side_lo[0][pos]), float(side_lo[1][pos])
                    to_gen = moved[:1] if refill and name == ACTOR_GEN else []
                    others = moved[len(to_gen):]
                    floor_r, floor_s = (_priced(x, self._realloc_floor) for x in (others, to_gen))
                    if moved and max(lo_g, lo_r + floor_r) + sync + floor_s / k_sync >= B:
                        continue
                    add = _priced(others, self._realloc_seconds)
                    new_sync = sync + _priced(to_gen, self._realloc_seconds) / k_sync
                    if max(lo_g, lo_r + add) + new_sync >= B:
                        continue
                    new_occ = _occupy(occ, cand.idx, name == ACTOR_GEN)
                else:
                    if moved and lower + sum(n * self._realloc_floor(m, a, b) for n, m, a, b in moved) >= B:
                        continue
                    add = sum(n * self._realloc_seconds(m, a, b) for n, m, a, b in moved)
                    if lower + add >= B:
                        continue
                new_loads = dict(loads)
                for ph, t in cand.phases.items():
                    new_loads[ph] = loads[ph].copy()
                    new_loads[ph][cand.idx] += t
                dfs(i + 1, moves + add, new_loads, new_peaks, new_chosen, new_placed, new_static, rows,
                    new_sync, new_occ)
                B = bound()

        if all(cands[n] for n in order):
            zero = np.zeros(self.world)
            spare = np.zeros(self.world + 1)  # loads: one element past the last rank (_CostTable)
            occ = (np.zeros(self.world + 1), np.zeros(self.world + 1)) if A else None
            dfs(0, 0.0, dict.fromkeys(phases, spare), dict.fromkeys(phases, 0.0), {}, frozenset(),
                (zero, zero, zero), [], 0.0, occ)
        return SearchResult(self.cfg, best, not state["stopped"], state["visited"],
                            {n: len(cands[n]) for n in order}, time.perf_counter() - t0)


class _CostTable:
    """A call's candidates' costs as arrays: the total (ascending, as the candidates are sorted),
    the time per phase, and each one's mesh among the call's distinct meshes, for pricing a whole
    list at once. ``bounds`` holds each mesh's [start, end) for `np.maximum.reduceat` (loads carry
    one spare element past the last rank for it); ``meshes`` the index of each, when one is not a
    contiguous range of ranks."""

    def __init__(self, cands: list[Candidate], phases: list[int]):
        self.phases = phases
        self.cost = np.array([c.cost for c in cands])
        self.times = np.array([[c.phases.get(ph, 0.0) for ph in phases] for c in cands]).reshape(
            len(cands), len(phases))
        number, self.meshes, mesh_of = {}, [], []  # each distinct mesh once, in first-seen order
        for c in cands:
            key = _mesh_key(c.idx)
            if key not in number:
                number[key] = len(self.meshes)
                self.meshes.append(c.idx)
            mesh_of.append(number[key])
        self.mesh_of = np.array(mesh_of, dtype=np.int64)
        self.contiguous = all(isinstance(ix, slice) for ix in self.meshes)
        self.bounds = np.array([b for ix in self.meshes for b in (ix.start, ix.stop)] if self.contiguous
                               else [], dtype=np.int64)

    def mesh_loads(self, load: np.ndarray) -> np.ndarray:
        """The busiest rank's load on each of the call's meshes."""
        if self.contiguous:
            return np.maximum.reduceat(load, self.bounds)[::2]
        return np.array([load[ix].max() for ix in self.meshes])


def _priced(moves: list[tuple], price) -> float:
    """Seconds of weight moves (times per step, model, from, to) at ``price`` per move."""
    return sum(n * price(m, a, b) for n, m, a, b in moves)


def _occupy(occ: tuple[np.ndarray, np.ndarray], idx, gen: bool) -> tuple[np.ndarray, np.ndarray]:
    """Async: (actor_gen's ranks, the other calls' ranks) with the mesh ``idx`` added to one."""
    g, u = occ
    if gen:
        g = g.copy()
        g[idx] = 1
    elif not u[idx].all():
        u = u.copy()
        u[idx] = 1
    return g, u


def _mesh_key(idx) -> tuple:
    return (idx.start, idx.stop) if isinstance(idx, slice) else tuple(idx.tolist())


def _index(ranks) -> slice | np.ndarray:
    lo, hi = ranks[0], ranks[-1]
    return slice(lo, hi + 1) if list(ranks) == list(range(lo, hi + 1)) else np.array(ranks)


def _peak(picked: list[Candidate], static, stop_above: float = math.inf) -> float:
    """The largest bytes on a rank while one of the picked calls' rows runs there, given the
    resident bytes ``static`` (base, optimizer kept, optimizer offloaded outside training); the
    first row over ``stop_above`` ends the scan."""
    base, fixed, off = static
    other = base + fixed
    train = other + off
    peak = 0.0
    for cand in picked:
        for e, k in zip(cand.extra, cand.kinds):
            peak = max(peak, float(((train if k == "train" else other)[cand.idx] + e).max()))
            if peak > stop_above:
                return peak
    return peak


def _own_extra(p: CallPlan, cfg: RunConfig, wl: cm.Workload, stage: int) -> float:
    """What a call needs beyond the resident weights: its activations and KV cache."""
    m = own_memory(p, cfg, wl, stage)
    return m.activations + m.kv


def _drop_dominated(cands: list[Candidate]) -> list[Candidate]:
    """Within one layout, drop a microbatch size when another is no slower and needs no more
    memory on any rank in any row (the weights, and so everything else, are the same)."""
    groups: dict[tuple, list[Candidate]] = {}
    for c in cands:
        groups.setdefault(c.choice.layout_key, []).append(c)
    out = []
    for group in groups.values():
        for c in group:
            if not any(o is not c and all(o.phases[ph] <= t for ph, t in c.phases.items())
                       and all((eo <= ec).all() for eo, ec in zip(o.extra, c.extra))
                       and (o.cost < c.cost or any((eo < ec).any() for eo, ec in zip(o.extra, c.extra))
                            or o.choice < c.choice)
                       for o in group):
                out.append(c)
    return out


def with_calls(cfg: RunConfig, choices: dict[str, Choice], calls: dict[str, CallSpec]) -> RunConfig:
    """``cfg`` with every call's layout set to ``choices``."""
    out = copy.deepcopy(cfg)
    out.calls = {name: ch.spec(calls[name].model) for name, ch in choices.items()}
    return out


def search_config(cfg: RunConfig, *, free: list[str] | None = None, device: str | None = None,
                  rates_path: str | None = None, top: int = 3, budget: int = DEFAULT_BUDGET,
                  microbatch_tokens=MICROBATCH_TOKENS, prompt_len=None, response_len=None,
                  decode_steps=None) -> SearchResult:
    """Search, then price the best plan (and the config's own) by `plan_config`, which must agree."""
    rates = load_rates(device or cfg.cluster.device, rates_path)
    lens = dict(prompt_len=prompt_len, response_len=response_len, decode_steps=decode_steps)
    s = Search(cfg, free=free, rates=rates, top=top, budget=budget,
               microbatch_tokens=microbatch_tokens, **lens)
    res = s.run()
    res.calls = s.calls
    try:
        res.config_report = plan_config(cfg, rates=rates, **lens)
    except PlanError as e:
        res.notes.append(f"the config's own layouts: {e}")
    if res.plans:
        res.report = plan_config(with_calls(cfg, res.plans[0].choices, s.calls), rates=rates, **lens)
        priced = res.report.objective_seconds
        if res.report.fit_error or not math.isclose(priced, res.plans[0].seconds, rel_tol=1e-9):
            raise AssertionError(f"search priced its plan at {res.plans[0].seconds!r} s, meshrl plan at "
                                 f"{priced!r} s ({res.report.fit_error}): the two models disagree")
    else:
        res.no_fit = no_fit_message(s)
    return res


# ---- what `meshrl plan --search` prints ---------------------------------------------------------

def calls_yaml(choices: dict[str, Choice], calls: dict[str, CallSpec]) -> str:
    """The ``calls:`` block, ready to paste into the config."""
    width = max(map(len, choices)) + 1
    lines = ["calls:"]
    for name in sorted(choices, key=lambda n: (n not in TRAIN_CALLS, n)):
        fields = choices[name].as_dict(calls[name].model)
        fields["ranks"] = f'"{fields["ranks"]}"'
        lines.append(f"  {name + ':':<{width}} {{" + ", ".join(f"{k}: {v}" for k, v in fields.items())
                     + "}")
    return "\n".join(lines)


def _changes(a: dict[str, Choice], b: dict[str, Choice]) -> str:
    return "; ".join(f"{n}: {b[n].describe()}" for n in sorted(a) if a[n] != b[n]) or "the same layouts"


def peak_gb(report: PlanReport) -> float:
    return max(p.peak for p in report.calls) / cm.GB


def format_search(res: SearchResult, calls: dict[str, CallSpec]) -> str:
    from .plan_format import format_report
    cfg, cl = res.cfg, res.cfg.cluster
    unit = "round" if res.report is not None and res.report.round_workload is not None else "step"
    how = ("exact" if res.complete else
           f"stopped at --search-budget {res.visited - 1:,} partial plans: the best found, not proven best")
    out = [f"search: {cfg.algorithm} on {cl.nodes} nodes × {cl.gpus_per_node} GPUs; "
           + ", ".join(f"{n} {k} layouts" for n, k in res.candidates.items())
           + f" (after memory and dominance pruning); {res.visited:,} partial plans in "
           f"{res.seconds:.1f} s; {how}"]
    best = res.plans[0]
    given = res.config_report
    versus = ""
    if given is not None and given.fit_error is None:
        g = given.objective_seconds
        versus = f"; the config's layouts: {g:.3f} s ({(best.seconds - g) / g * 100:+.1f}%)"
    elif given is not None:
        versus = f"; the config's layouts do not fit ({given.fit_error})"
    out += [f"best plan: {best.seconds:.3f} s per {unit}{versus}", "", calls_yaml(best.choices, calls)]
    if len(res.plans) > 1:
        out.append("")
    for i, alt in enumerate(res.plans[1:], 2):
        out.append(f"#{i}: {alt.seconds:.3f} s  ({_changes(best.choices, alt.choices)})")
    out += res.notes
    out += ["", "the best plan, as `meshrl plan` prices it:", "", format_report(res.report)]
    return "\n".join(out)


def search_json(res: SearchResult, calls: dict[str, CallSpec]) -> dict:
    from .plan_format import async_numbers

    def plan_dict(p: Plan) -> dict:
        return {"seconds": p.seconds,
                "calls": {n: ch.as_dict(calls[n].model) for n, ch in p.choices.items()}}
    given = res.config_report
    return {"algorithm": res.cfg.algorithm, "nodes": res.cfg.cluster.nodes,
            "gpus_per_node": res.cfg.cluster.gpus_per_node, "exact": res.complete,
            "partial_plans": res.visited, "search_seconds": res.seconds, "candidates": res.candidates,
            "config_seconds": (given.objective_seconds if given is not None and given.fit_error is None
                               else None),
            "best": {**plan_dict(res.plans[0]), "peak_gb": peak_gb(res.report),
                     "per_call": {p.name: p.time.seconds for p in res.report.calls if p.time},
                     "reallocs": {f"{x['src']}→{x['dst']}": x["seconds"] for x in res.report.reallocs},
                     "async": async_numbers(res.report)},
            "alternatives": [plan_dict(p) for p in res.plans[1:]], "notes": res.notes}


def no_fit_message(s: Search) -> str:
    """One line: the call whose smallest need (its own weights and work, alone on its GPUs) is the
    largest, and how many nodes the models' weights and training state need at the least."""
    worst, need = None, 0.0
    for name in s.order:
        model, best = s.calls[name].model, math.inf
        home = name == s.home_call[model]
        for ch in s._choices(name):
            layout = s._layout(name, ch)
            if layout is not None:
                cand = s._candidate(name, ch, layout, home)
                best = min(best, _peak([cand], s._placement(model, ch, layout, home)))
        if best > need:
            worst, need = name, best
    state = 0.0  # every model's weights, and a trained model's fp32 grads and Adam moments
    for model, mc in s.mcfg.items():
        P = cm.stage_params(cm.CallShape(mc, s.heads[model]), 0)
        state += P * cm.DTYPE_BYTES[s.cfg.models[model].dtype] + (16 * P if model in s.trained else 0)
    cl = s.cfg.cluster
    nodes = max(math.ceil(state / (s.budget_bytes * s.gpn)), cl.nodes + 1)  # this one failed
    apart = (f" with calls.{ACTOR_GEN} on ranks of its own (async.max_staleness={s.staleness})"
             if s.staleness else "")
    return (f"no plan fits {cl.gpu_mem_gb:g} GB per GPU on {cl.nodes} nodes × {s.gpn} GPUs{apart}: the "
            f"largest need is calls.{worst}'s, {need / cm.GB:.1f} GB per GPU in its best layout with no "
            f"other model beside it, and the models' weights and training state ({state / cm.GB:,.0f} GB) "
            f"need at least {nodes} nodes of {s.gpn}: find the smallest that fits with --nodes "
            f"{','.join(str(n) for n in _powers_of_two(8 * nodes) if n >= nodes)}")


def add_arguments(p):
    g = p.add_argument_group("search (meshrl plan CONFIG --search)")
    g.add_argument("--search", action="store_true",
                   help="choose every call's mesh, tp, pp, dp and microbatch_tokens for the least "
                        "estimated step within gpu_mem_gb (exact branch and bound)")
    g.add_argument("--search-calls", help="comma-separated calls to search (default: all); the others "
                   "keep the config's layout")
    g.add_argument("--nodes", help="comma-separated cluster sizes in nodes (e.g. 1,2,4,8,16): the best "
                   "plan of each, and the smallest that fits")
    g.add_argument("--top", type=int, default=3, help="plans to show: the best and the runners-up (3)")
    g.add_argument("--search-budget", type=int, default=DEFAULT_BUDGET,
                   help=f"partial plans to visit before stopping with the best so far ({DEFAULT_BUDGET:,})")
    g.add_argument("--write", metavar="OUT.yaml", help="write the config with the best plan's calls")
    g.add_argument("--json", action="store_true", help="print the result as JSON")


def check_arguments(args):
    """Search options without --search, or that contradict each other: one line naming the flag."""
    given = [f for f, v in (("--search-calls", args.search_calls), ("--nodes", args.nodes),
                            ("--write", args.write)) if v]
    if not args.search and given:
        raise SearchError(f"{given[0]} needs --search: add it (meshrl plan CONFIG --search {given[0]} ...)")
    if args.top < 1:
        raise SearchError(f"--top {args.top}: show at least 1 plan")
    if args.search_budget < 1:
        raise SearchError(f"--search-budget {args.search_budget}: visit at least 1 partial plan")
    if args.nodes:
        try:
            sizes = [int(x) for x in args.nodes.split(",")]
        except ValueError:
            raise SearchError(f"--nodes {args.nodes}: give node counts separated by commas, e.g. "
                              "--nodes 1,2,4,8") from None
        if not sizes or min(sizes) < 1:
            raise SearchError(f"--nodes {args.nodes}: node counts must be 1 or more")
        if args.write and len(sizes) > 1:
            raise SearchError(f"--write with --nodes {args.nodes}: one config per cluster size is "
                              "ambiguous; give one size to --nodes, or drop --write")
        return sizes
    return None


def write_config(path: str, config_path: str | None, overrides, choices, calls, nodes=None):
    from omegaconf import OmegaConf
    raw = OmegaConf.load(config_path) if config_path else OmegaConf.create({})
    if overrides:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    raw.calls = {n: ch.as_dict(calls[n].model) for n, ch in choices.items()}
    if nodes is not None:
        raw.cluster.nodes = nodes
    OmegaConf.save(raw, path)


def run_search(args, cfg: RunConfig) -> int:
    sizes = check_arguments(args)
    free = [x.strip() for x in args.search_calls.split(",")] if args.search_calls else None
    kw = dict(free=free, device=args.device, rates_path=args.rates, top=args.top,
              budget=args.search_budget, prompt_len=args.prompt_len, response_len=args.response_len)
    if sizes is None or len(sizes) == 1:
        if sizes:
            cfg = copy.deepcopy(cfg)
            cfg.cluster.nodes = sizes[0]
        res = search_config(cfg, **kw)
        calls = res.calls
        if not res.plans:
            raise SearchError(res.no_fit)
        print(json.dumps(search_json(res, calls), indent=1) if args.json else format_search(res, calls))
        if args.write:
            write_config(args.write, args.config, args.overrides, res.plans[0].choices, calls,
                         sizes[0] if sizes else None)
            if not args.json:
                print(f"\nwrote {args.write}")
        return 0
    return _sweep(args, cfg, sizes, kw)


def _sweep(args, cfg: RunConfig, sizes: list[int], kw: dict) -> int:
    """`--nodes 1,2,4,...`: the best plan per cluster size, and the smallest that fits."""
    rows, fits = [], None
    for n in sorted(set(sizes)):
        c = copy.deepcopy(cfg)
        c.cluster.nodes = n
        c.calls = {}  # the config's ranks belong to its own cluster size
        res = search_config(c, **kw)
        if res.plans:
            rep = res.report
            wl = rep.workload
            rows.append({"nodes": n, "gpus": rep.world, "seconds": rep.objective_seconds,
                         "samples_per_s": wl.sequences / rep.step_seconds, "peak_gb": peak_gb(rep),
                         "exact": res.complete,
                         "calls": search_json(res, res.calls)["best"]["calls"]})
            fits = n if fits is None else fits
        else:
            rows.append({"nodes": n, "gpus": n * c.cluster.gpus_per_node, "seconds": None,
                         "why": res.no_fit})
    if args.json:
        print(json.dumps({"sizes": rows, "smallest_that_fits": fits}, indent=1))
    else:
        print(f"{'nodes':>5}{'GPUs':>6}{'step s':>9}{'samples/s':>11}{'peak GB':>9}  plan")
        for r in rows:
            if r["seconds"] is None:
                print(f"{r['nodes']:>5}{r['gpus']:>6}{'-':>9}{'-':>11}{'-':>9}  {r['why']}")
                continue
            lay = ", ".join(f"{n} tp{c['tp']}·pp{c['pp']}·dp{c['dp']}"
                            + (f"·ep{c['ep']}" if c.get("ep", 1) > 1 else "") for n, c in r["calls"].items())
            print(f"{r['nodes']:>5}{r['gpus']:>6}{r['seconds']:>9.3f}{r['samples_per_s']:>11.1f}"
                  f"{r['peak_gb']:>9.1f}  {lay}" + ("" if r["exact"] else "  (budget reached)"))
        print(f"smallest cluster that fits: {fits} nodes" if fits is not None else
              "no cluster size given fits: add larger sizes to --nodes")
    if fits is None:
        raise SearchError(f"--nodes {args.nodes}: no size fits; " + rows[-1]["why"])
    return 0


def plan_auto_calls(cfg: RunConfig, world: int, gpus_per_node: int) -> tuple[RunConfig, dict]:
    """``calls: auto`` at start-up: the search on the cluster the launcher gives (``world`` ranks,
    ``gpus_per_node`` per node), run by rank 0 and broadcast, so every rank takes the same plan.
    Returns the config with the chosen layouts (and that cluster), and the record for
    placement.json. No plan that fits is the one-line error on every rank."""
    import torch.distributed as dist

    from meshrl.engine.runtime.placement import broadcast_from
    c = copy.deepcopy(cfg)
    if world % gpus_per_node:
        gpus_per_node = world
    c.cluster.nodes, c.cluster.gpus_per_node = world // gpus_per_node, gpus_per_node
    free = None if "all" in cfg.auto_calls else list(cfg.auto_calls)
    outcome = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            res = search_config(c, free=free)
            if res.plans:
                outcome = ("plan", res.plans[0].choices, {
                    "searched": "all" if free is None else free, "estimate_seconds": res.plans[0].seconds,
                    "exact": res.complete, "partial_plans": res.visited,
                    "search_seconds": round(res.seconds, 3), "cluster": [c.cluster.nodes, gpus_per_node],
                    "rates": res.report.rates.device})
            else:
                outcome = ("error", res.no_fit)
        except RunConfigError as e:
            outcome = ("error", f"calls: auto: {e}")
    outcome = broadcast_from(outcome, 0)
    if outcome[0] == "error":
        raise SearchError(outcome[1])
    _, choices, record = outcome
    c = with_calls(c, choices, complete_calls(c, world))  # the search chose every call's layout
    c.auto_calls = []
    return c, record
