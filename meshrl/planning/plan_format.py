"""`meshrl plan`'s printed report: the memory, reallocation and time tables of a ``PlanReport``."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

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
    out = [("memory per GPU, GB = 1e9 bytes (worst rank of each call; other = the other models and "
            "this model's state kept meanwhile; v = a view filled by reallocation)"),
           (f"{'call':<13}{'model':<8}{'layout':<17}{'params':>7}{'grads':>7}{'optim':>7}"
            f"{'activ':>7}{'KV':>7}{'other':>7}{'peak':>7}")]
    for p in report.calls:
        m, lay = p.memory, p.tag + ("" if p.home else " v")
        cols = (m.params, m.grads, m.optim, m.activations, m.kv, p.resident, p.peak)
        out.append(f"{p.name:<13}{p.model:<8}{lay:<17}" + "".join(f"{_gb(x):>7}" for x in cols)
                   + ("  > budget" if p.peak > budget else ""))
    return out


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
                   + f"{str(x['per_step']) if not x.get('per_round') else '1/round':>9}")
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
    for x in report.reallocs:
        n = x.get("per_round", 0) if per_round else x["per_step"]
        if n:
            out.append(f"{'realloc/' + x['dst']:<17}{x['seconds'] * n:>9.3f}")
    return out


def _time_table(report: PlanReport) -> list[str]:
    head = f"{'call':<17}{'seconds':>9}{'tokens/s':>11}{'TFLOP/s/GPU':>12}  where the time goes"
    out = ["", ("estimated time per step (the runtime's phases one after another; a phase's calls "
                "overlap where their meshes are disjoint)"), head]
    out += _time_rows(report, False)
    out.append(f"{'step':<17}{report.step_seconds:>9.3f}")
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
    out += ["", "rates:"] + [f"  {k} = {_fmt(getattr(r, k))}  ({v})" for k, v in r.sources.items()]
    out += report.notes  # a layout that does not fit is the error `meshrl plan` ends with
    return "\n".join(out)
