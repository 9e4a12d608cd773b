"""`meshrl plan`'s printed report: the memory, reallocation and time tables of a ``PlanReport``."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from meshrl.engine.dataflow import ACTOR_GEN

from . import costmodel as cm

if TYPE_CHECKING:  # plan.py imports this module
    from .plan import PlanReport


def _gb(x: float) -> str:
    return f"{x / cm.GB:.1f}" if x else "-"


def _fmt(x: float, digits=3) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if x < 1e4:
        return f"{x:,.{digits}g}"
    return f"{x:,.0f}" if x < 1e7 else f"{x:.{digits}g}"  # fits the tables' columns either way


def _memory_table(report: PlanReport) -> list[str]:
    budget = report.cfg.cluster.gpu_mem_gb * cm.GB
    w = max(17, *(len(p.tag) + 3 for p in report.calls))
    out = [("memory per GPU, GB = 1e9 bytes (worst rank of each call; other = the other models and "
            "this model's state kept meanwhile; v = a view filled by reallocation)"),
           (f"{'call':<13}{'model':<8}{'layout':<{w}}{'params':>7}{'grads':>7}{'optim':>7}"
            f"{'activ':>7}{'KV':>7}{'other':>7}{'peak':>7}")]
    for p in report.calls:
        m, lay = p.memory, p.tag + ("" if p.home else " v")
        cols = (m.params, m.grads, m.optim, m.activations, m.kv, p.resident, p.peak)
        out.append(f"{p.name:<13}{p.model:<8}{lay:<{w}}" + "".join(f"{_gb(x):>7}" for x in cols)
                   + ("  > budget" if p.peak > budget else ""))
    return out


def _a2a_lines(report: PlanReport) -> list[str]:
    """The experts' all-to-alls of the calls that share out experts (MoE models at ep > 1)."""
    rows = [p for p in report.calls if p.time is not None and p.time.a2a_seconds > 0]
    if not rows:
        return []
    out = ["", ("expert all-to-all (MoE, ep > 1: every MoE layer sends each token to its k experts "
                "and back within the ep group; seconds and GB leaving the busiest GPU per step)")]
    for p in rows:
        t, links = p.time, cm.group_links(p.layout, report.cfg.cluster, report.rates).ep
        where = (f"{links.inter_peers} of {links.size - 1} peers on other nodes" if links.inter_peers
                 else "within a node")
        out.append(f"{p.name:<17}{p.tag:<20}{t.a2a_seconds:>9.3f} s{t.a2a_bytes / cm.GB:>9.1f} GB"
                   f"  ({t.a2a_seconds / t.seconds:.0%} of the call; {where})")
    return out


def _moves_per_step(report: PlanReport, x: dict) -> str:
    """How often a reallocation runs per step: async moves into actor_gen every sync_every steps."""
    if x.get("per_round"):
        return "1/round"
    k = report.cfg.async_.sync_every
    if report.max_staleness and x["dst"] == ACTOR_GEN and x["per_step"] and k > 1:
        return f"{x['per_step']}/{k}"
    return str(x["per_step"])


def _realloc_table(report: PlanReport) -> list[str]:
    out = ["", ("reallocation by the planner on meta-built specs. Per GPU: the busiest rank's bytes "
                "each way; its time is max(NVLink s, IB s) + a latency per peer, then local copies"),
           (f"{'model':<20}{'from → to':<26}{'remote GB':>10}{'x-node GB':>10}{'local GB':>9}"
            f"{'NVLink GB/GPU':>14}{'IB GB/GPU':>10}{'NVLink s':>9}{'IB s':>7}{'local s':>8}"
            f"{'total s':>8}{'per step':>9}")]
    for x in report.reallocs:
        sizes = (x["remote_bytes"], x["cross_node_bytes"], x["local_bytes"], x["intra_max_bytes"],
                 x["inter_max_bytes"])
        secs = (x["intra_seconds"], x["inter_seconds"], x["local_seconds"], x["seconds"])
        out.append(f"{x['model']:<20}{x['src'] + ' → ' + x['dst']:<26}"
                   + "".join(f"{_gb(v):>{w}}" for v, w in zip(sizes, (10, 10, 9, 14, 10)))
                   + "".join(f"{v:>{w}.3f}" for v, w in zip(secs, (9, 7, 8, 8)))
                   + f"{_moves_per_step(report, x):>9}")
    return out


def _time_rows(report: PlanReport, per_round: bool) -> list[str]:
    out, phases = [], report.phase_seconds(per_round)
    rows = [p for p in report.calls if p.time is not None and p.per_round == per_round]
    for i, p in enumerate(rows):
        t = p.time
        parts = ", ".join(f"{k} {v:.3g}" for k, v in t.parts.items() if v > 0.005 * t.seconds)
        out.append(f"{p.name:<17}{t.seconds:>9.3f}{_fmt(t.tokens_per_s):>11}"
                   f"{_fmt(t.tflops_per_gpu):>12}  {parts}")
        same = [q for q in rows if q.phase == p.phase]
        if len(same) > 1 and (i + 1 == len(rows) or rows[i + 1].phase != p.phase):
            names = " ∥ ".join(q.name for q in same)
            out.append(f"{'  phase':<17}{phases[p.phase]:>9.3f}  ({names}: the busiest rank's "
                       "share; disjoint meshes overlap)")
    sides = None if per_round else report.async_sides()
    for x in report.reallocs:
        n = x.get("per_round", 0) if per_round else x["per_step"]
        if not n:
            continue
        if sides is not None and x["dst"] == ACTOR_GEN and sides.sync_every > 1:
            out.append(f"{'realloc/' + x['dst']:<17}{x['seconds'] * n / sides.sync_every:>9.3f}  "
                       f"(one move of {x['seconds'] * n:.3f} s every {sides.sync_every} steps)")
        else:
            out.append(f"{'realloc/' + x['dst']:<17}{x['seconds'] * n:>9.3f}")
    return out


def async_numbers(report: PlanReport) -> dict | None:
    """`async_line`'s figures for ``--json``; None for the synchronous loop."""
    a = report.async_sides()
    if a is None:
        return None
    return {"max_staleness": report.max_staleness, "sync_every": a.sync_every,
            "generation_seconds": a.gen, "training_seconds": a.rest, "weight_move_seconds": a.sync,
            "weight_move_per_step": a.sync / a.sync_every, "step_seconds": a.step,
            "generation_idle": a.idle(a.gen), "training_idle": a.idle(a.rest),
            "synchronous_step_seconds": report.synchronous_step_seconds}


def async_line(report: PlanReport) -> str | None:
    """Under async: each side's seconds and idle fraction, the weight move per step, the step,
    and the synchronous step of the same layouts for comparison."""
    a = report.async_sides()
    if a is None:
        return None
    sync, gain = report.synchronous_step_seconds, ""
    if sync > 0:
        gain = f" (async {(a.step - sync) / sync * 100:+.1f}%)"
    return (f"async steady state: generation {a.gen:.3f} s (idle {a.idle(a.gen):.1%}) ∥ training "
            f"{a.rest:.3f} s (idle {a.idle(a.rest):.1%}) + weight move {a.sync / a.sync_every:.3f} s "
            f"per step = {a.step:.3f} s per step; the same layouts synchronously: {sync:.3f} s{gain}")


def _time_table(report: PlanReport) -> list[str]:
    head = f"{'call':<17}{'seconds':>9}{'tokens/s':>11}{'TFLOP/s/GPU':>12}  where the time goes"
    out = ["", ("estimated time per step (the runtime's phases one after another; a phase's calls "
                "overlap where their meshes are disjoint)"), head]
    if report.max_staleness:
        out[1] = (f"estimated time per step (async.max_staleness={report.max_staleness}: actor_gen "
                  "generates the next batch on its own ranks while the other phases, one after "
                  "another, train on this one; step = max(generation, training) + weight move / "
                  f"async.sync_every={report.cfg.async_.sync_every})")
    out += _time_rows(report, False)
    out.append(f"{'step':<17}{report.step_seconds:>9.3f}")
    line = async_line(report)
    if line:
        out.append(line)
    rnd = _time_rows(report, True)
    if rnd and report.round_workload is not None:
        rw = report.round_workload
        out += ["", (f"per online round: sampling {rw.sequences} responses "
                     f"({report.cfg.dpo.prompts_per_round} prompts × "
                     f"{report.cfg.dpo.samples_per_prompt}) before its steps, the reference "
                     "refilled after them"), head]
        out += rnd
        out.append(f"{'round':<17}{report.round_seconds:>9.3f}")
        out.append(f"a round: {report.round_seconds:.3f} s + up to {report.steps_per_round} steps × "
                   f"{report.step_seconds:.3f} s (prompts whose responses tie make no pair) = "
                   f"{report.objective_seconds:.3f} s at most")
    return out


def format_report(report: PlanReport) -> str:
    cfg, cl, wl, r = report.cfg, report.cfg.cluster, report.workload, report.rates
    out = [(f"{cfg.algorithm} on {cl.nodes} nodes × {cl.gpus_per_node} GPUs ({report.world}), "
            f"{cl.gpu_mem_gb:g} GB each; rates: {r.device}"),
           (f"workload: {wl.sequences} sequences × ({wl.prompt_len:g} prompt + {wl.response_len:g} "
            f"response) = {wl.tokens:,.0f} tokens per step, "
            + ("" if cfg.algorithm in cm.SEQS_PER_EXAMPLE else f"{wl.decode_steps} decoding steps, ")
            + f"{wl.updates} optimizer steps per trained model"
            + (f"; generation also decodes {wl.extra_generated} greedy baselines (ReMax)"
               if wl.extra_generated else "")
            + ("; dynamic sampling is priced as one draw (each extra draw of a step adds a "
               "generation call of the same size, up to grpo.max_sampling_rounds)"
               if cfg.algorithm == "grpo" and cfg.grpo.dynamic_sampling else "")), ""]
    out += _memory_table(report)
    if report.reallocs:
        out += _realloc_table(report)
    if any(p.time for p in report.calls):
        out += _time_table(report)
        out += _a2a_lines(report)
    out += ["", "rates:"] + [f"  {k} = {_fmt(getattr(r, k))}  ({v})" for k, v in r.sources.items()]
    out += report.notes  # a layout that does not fit is the error `meshrl plan` ends with
    return "\n".join(out)
