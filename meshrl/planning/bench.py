"""`meshrl bench CONFIG [key=value ...] [--iterations N]`: run a few steps of a PPO, GRPO, SFT, RM or
offline DPO config and put each call's measured seconds next to `meshrl plan`'s estimate for the
same config.

Measured: the runtime's ``time/<call>`` and ``time/realloc/<call>`` per step (metrics.jsonl), the
first iteration left out as warm-up when there are several. The estimate is the plan for the
workload the run actually had: mean prompt and response lengths from the rollout dumps (PPO, GRPO;
decoding steps = the longest response, as the engine decodes until every sequence of a batch is
done) or from the steps' logged data lengths (SFT, RM, DPO).

``python -m meshrl.planning.bench --calibrate`` measures this machine's CPU rates with meshrl's
own train step, forward pass, decoding loop, optimizer and gloo links, and writes them as
``devices.cpu`` of ``benchmarks/rates.json``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time

import torch

from meshrl.engine.dataflow import DATAFLOW_TIMER
from meshrl.engine.runtime.config import load_run_config
from meshrl.engine.runtime.metrics import read_metrics
from .plan import PlanError, plan_config
from .rates import default_rates_path

# the row comparing the step: the dataflow's measured wall time (its phases, calls on disjoint meshes
# overlapping, refills and blends) against the plan's step estimate
STEP_ROW = "step (dataflow)"

# the config field that bounds a short run, per algorithm
STEP_LIMIT = {"ppo": ("ppo", "iterations"), "grpo": ("grpo", "iterations"), "sft": ("sft", "steps"),
              "rm": ("rm", "steps"), "dpo": ("dpo", "steps")}


def _device_name(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "-")


def measured(run_dir: str, skip_first: bool) -> tuple[dict[str, float], dict]:
    """Mean seconds per step of every ``time/...`` metric, and the workload of the same steps: the
    data lengths the steps logged (SFT, RM, DPO), else their rollout dumps (PPO, GRPO)."""
    rows = [r for r in read_metrics(run_dir) if r.get("phase", "train") == "train"]
    rows = rows[1:] if skip_first and len(rows) > 1 else rows
    keys = sorted({k for r in rows for k in r if k.startswith("time/")} | {"step_seconds"})
    times = {k: statistics.mean(r[k] for r in rows if r.get(k) is not None) for k in keys
             if any(r.get(k) is not None for r in rows)}
    if any("data/prompt_len" in r for r in rows):
        return times, {k: statistics.mean(r[f"data/{k}"] for r in rows if f"data/{k}" in r)
                       for k in ("prompt_len", "response_len")}
    prompts, responses = [], []
    for r in rows:  # only the timed steps' dumps: not the warm-up, not an earlier run's
        path = os.path.join(run_dir, "rollouts", f"step_{r['step']}.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    rec = json.loads(line)
                    prompts.append(len(rec["prompt_ids"]))
                    responses.append(len(rec["output_ids"]))
    work = {}
    if prompts:
        work = dict(prompt_len=statistics.mean(prompts), response_len=statistics.mean(responses),
                    decode_steps=max(responses))
    return times, work


def _match_cluster(cfg, world: int):
    """Make the config's cluster the launched one, with the runtime's node rule (torchrun's local
    world size, else cluster.gpus_per_node): a CPU run is one host whatever cluster the config
    names, and the estimate must price the links the run had."""
    cl = cfg.cluster
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or min(world, cl.gpus_per_node)
    if world % local:
        local = world
    cl.nodes, cl.gpus_per_node = world // local, local


def bench_config(cfg, *, iterations: int = 3, run_dir: str | None = None, device: str | None = None,
                 rates_path: str | None = None) -> dict | None:
    """Run ``iterations`` steps and compare with the plan. Returns (on rank 0) {"rows": [...],
    "plan": PlanReport, "measured": {...}}; None elsewhere."""
    from meshrl.engine.distributed import init_distributed, is_main, world

    from meshrl.engine.runtime.run import run_config

    from .search import plan_auto_calls
    if cfg.algorithm not in STEP_LIMIT:
        raise PlanError(f"algorithm={cfg.algorithm}: meshrl bench runs {', '.join(STEP_LIMIT)} configs")
    if cfg.algorithm == "dpo" and cfg.dpo.rounds:
        raise PlanError(f"dpo.rounds={cfg.dpo.rounds}: meshrl bench times offline DPO steps; set "
                        "dpo.rounds=0 (plan prices the online rounds on their own)")
    dev = init_distributed()
    tmp = None
    if run_dir is None:
        tmp = tempfile.mkdtemp(prefix="meshrl-bench-")
        run_dir = os.path.join(tmp, "run")
    section, field = STEP_LIMIT[cfg.algorithm]
    setattr(getattr(cfg, section), field, iterations)
    batch = cfg.ppo.batch_size if cfg.algorithm == "ppo" else cfg.grpo.batch_size * cfg.grpo.group_size
    cfg.run_dir, cfg.resume, cfg.save_hf = run_dir, False, False
    cfg.logging.dump_rollouts = batch if cfg.algorithm in ("ppo", "grpo") else 0
    cfg.logging.eval_every = 0
    cfg.logging.save_every, cfg.logging.progress = 0, False
    run_config(cfg, plan_calls=plan_auto_calls)
    if not is_main():
        return None
    times, work = measured(run_dir, skip_first=iterations > 1)
    _match_cluster(cfg, world())
    report = plan_config(cfg, world=world(), device=device or _device_name(dev),
                         rates_path=rates_path, **work)
    return {"rows": compare(report, times), "plan": report, "measured": times, "workload": work,
            "run_dir": run_dir}


def compare(report, times: dict) -> list[dict]:
    """One row per call and reallocation: measured and estimated seconds, tokens/s, TFLOP/s/GPU."""
    rows = []
    for p in report.calls:
        meas = times.get(f"time/{p.name}")
        if p.time is None or meas is None:
            continue
        t = p.time
        rows.append({"call": p.name, "measured_s": meas, "estimated_s": t.seconds,
                     "measured_tokens_per_s": t.tokens / meas, "estimated_tokens_per_s": t.tokens_per_s,
                     "measured_tflops": t.flops / meas / t.gpus / 1e12,
                     "estimated_tflops": t.tflops_per_gpu})
    for x in report.reallocs:
        meas = times.get(f"time/realloc/{x['dst']}")
        if meas is not None and x["per_step"]:
            rows.append({"call": f"realloc/{x['dst']}", "measured_s": meas,
                         "estimated_s": x["seconds"] * x["per_step"]})
    step = f"time/{DATAFLOW_TIMER}"
    for k, v in times.items():  # measured but not modelled (a verifier, the EMA copy)
        name = k[len("time/"):] if k.startswith("time/") and k != step else None
        if name and all(r["call"] != name for r in rows):
            rows.append({"call": name, "measured_s": v, "estimated_s": None})
    if step in times:  # the phases' wall time, overlap included, against the plan's step
        rows.append({"call": STEP_ROW, "measured_s": times[step], "estimated_s": report.step_seconds})
    return rows


def format_bench(result: dict) -> str:
    def f(x, d=3):
        return "-" if x is None or not math.isfinite(x) else (f"{x:,.{d}g}" if x < 1e4 else f"{x:,.0f}")
    w = result["workload"]
    out = [(f"measured per step (first iteration left out) vs plan estimate on "
            f"{result['plan'].rates.device} rates; workload: {result['plan'].workload.sequences} "
            f"sequences, prompt {w.get('prompt_len', 0):.1f} + response "
            f"{w.get('response_len', 0):.1f} tokens"
            + (f", {w['decode_steps']} decoding steps" if "decode_steps" in w else "")),
           (f"{'call':<24}{'measured s':>11}{'plan s':>9}{'plan/meas':>10}{'tok/s meas':>12}"
            f"{'tok/s plan':>12}{'TFLOP/s/GPU meas':>17}{'plan':>9}")]
    for r in result["rows"]:
        m, e = r["measured_s"], r["estimated_s"]
        ratio = e / m if e is not None and m else None
        out.append(f"{r['call']:<24}{f(m):>11}{f(e):>9}{f(ratio, 2):>10}"
                   f"{f(r.get('measured_tokens_per_s')):>12}{f(r.get('estimated_tokens_per_s')):>12}"
                   f"{f(r.get('measured_tflops')):>17}{f(r.get('estimated_tflops')):>9}")
    step = result["measured"].get("step_seconds")
    out.append(f"{'step (measured, all work)':<24}{f(step):>11}{f(result['plan'].step_seconds):>9}")
    return "\n".join(out)


def add_arguments(p):
    p.add_argument("config", help="YAML run config (ppo, grpo, sft, rm, or offline dpo)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (omegaconf dotlist)")
    p.add_argument("--iterations", type=int, default=3,
                   help="iterations (ppo, grpo) or steps (sft, rm, dpo) to run (default 3)")
    p.add_argument("--run-dir", help="where the run writes (or a run_dir= override; default: a fresh "
                   "temporary directory, never the config file's run_dir)")
    p.add_argument("--device", help="whose rates the estimate uses (default: this machine's device)")
    p.add_argument("--rates", help="rates file (default benchmarks/rates.json or $MESHRL_RATES)")


def run(args) -> int:
    from meshrl.engine.distributed import shutdown
    cfg = load_run_config(args.config, args.overrides)
    # the config file's run_dir is the real run's, left alone; a run_dir= override is a request
    asked = any(o.split("=", 1)[0].strip() == "run_dir" for o in args.overrides)
    run_dir = args.run_dir or (cfg.run_dir if asked else None)
    result = bench_config(cfg, iterations=args.iterations, run_dir=run_dir, device=args.device,
                          rates_path=args.rates)
    if result is not None:
        print(format_bench(result))
    shutdown()
    return 0


# ---- CPU calibration ---------------------------------------------------------------------------

def _median(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fit(rows: list[tuple], names: list[str]) -> dict[str, float]:
    """Least squares y = Σ coef·x with every coefficient ≥ 0 (a negative one is dropped, refit)."""
    import numpy as np
    X = np.array([r[:-1] for r in rows], dtype=float)
    y = np.array([r[-1] for r in rows], dtype=float)
    keep = list(range(X.shape[1]))
    while True:
        coef = np.linalg.lstsq(X[:, keep], y, rcond=None)[0]
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    out = dict.fromkeys(names, 0.0)
    for i, c in zip(keep, coef):
        out[names[i]] = max(0.0, float(c))
    return out


def _gloo_links(rank: int, port: int, out) -> None:
    """Rank ``rank`` of a two-process gloo group: all-reduces of 4 KB to 4 MB, each issued after a
    few matmuls as a model's layers issue them (so a time includes waking the rank that waited, which
    back-to-back collectives hide: 0.1 ms against ~1 ms on a 2-core host), fit to the cost model's
    all-reduce on two ranks, latency + bytes / bandwidth. Both ranks' medians, averaged, go to
    ``out`` from rank 0."""
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    a = torch.randn(192, 192, generator=torch.Generator().manual_seed(0)) / 192 ** 0.5
    sizes = (4 << 10, 64 << 10, 512 << 10, 4 << 20)
    medians = torch.zeros(len(sizes), dtype=torch.float64)
    for i, nbytes in enumerate(sizes):
        x = torch.zeros(nbytes // 4)
        times = []
        for _ in range(65):
            b = a
            for _ in range(4):
                b = a @ b
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        medians[i] = statistics.median(times[5:])
    dist.all_reduce(medians)
    medians /= 2
    if rank == 0:
        fit = _fit([(1.0, n, t) for n, t in zip(sizes, medians.tolist())], ["latency_s", "s_per_byte"])
        out.put({"link_gbps": 1e-9 / fit["s_per_byte"] if fit["s_per_byte"] else math.inf,
                 "latency_s": fit["latency_s"]})
    dist.destroy_process_group()


def measure_links() -> dict[str, float]:
    """Two spawned processes over gloo on this host: link bandwidth and collective latency, as
    all-reduces between computations see them (`_gloo_links`)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return _spawned(_gloo_links, [(r, port) for r in range(2)], results=1, timeout=300)[0]


def _spawned(target, args: list[tuple], *, results: int, timeout: float) -> list:
    """One spawned process per entry of ``args``, each running ``target(*entry, queue)``; the first
    ``results`` items they put on the queue, once every process has been joined."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, queue)) for a in args]
    for p in procs:
        p.start()
    try:
        return [queue.get(timeout=timeout) for _ in range(results)]
    finally:
        for p in procs:
            p.join(timeout=60)


def _measure_rows(threads: int, barrier=None) -> dict[str, list[tuple]]:
    """meshrl's own train step, forward, decode, optimizer and a large copy on small Llamas (hidden
    64, 128 and 256, 1 and 4 layers) over microbatches shaped like RL's: many short sequences
    packed (8 of 16, 16 and 64 of 24 tokens), as regression rows (terms..., seconds). The hidden
    sizes separate the matrix work (∝ h²) from the elementwise work (∝ h) that tensor parallelism
    does not split; the 128-token microbatch (a narrower dense attention block) separates attention
    from the latter. ``barrier``: wait for the other measuring processes before starting."""
    from meshrl.engine.algorithms.calls import logprobs_call, sft_call
    from meshrl.engine.batch import pack
    from meshrl.engine import generation
    from meshrl.engine.model import build_stage, config_from_hf_dict
    from meshrl.engine.model.attention import DENSE_BLOCK_TOKENS
    from meshrl.engine.train import OptimConfig, Trainer, infer
    from meshrl.parallel.layout import ParallelLayout

    from .costmodel import attention_macs, attention_span
    torch.set_num_threads(threads)
    if barrier is not None:
        barrier.wait()
    g = torch.Generator().manual_seed(0)
    train, fwd, opt, dec = [], [], [], []
    for h in (64, 128, 256):
        for layers in (1, 4):
            cfg = config_from_hf_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 64,
                                       "hidden_size": h, "intermediate_size": 3 * h,
                                       "num_hidden_layers": layers, "num_attention_heads": 4,
                                       "num_key_value_heads": 2, "max_position_embeddings": 1024})
            stage = build_stage(ParallelLayout(ranks=[0]), config=cfg, seed=0)
            P, trainer = cfg.num_params(), Trainer(stage, OptimConfig(lr=1e-6))
            for n, length in ((8, 16), (16, 24), (64, 24)):
                mb = pack(torch.randint(1, 64, (n, length), generator=g).tolist(), loss_from=[0] * n)
                t_opt = _median(trainer.opt.step)
                t_step = _median(lambda tr=trainer, mb=mb, t=n * length: tr.step([mb], sft_call(t)))
                # multiply-adds per token as the cost model counts them: parameters and attention
                macs = P + layers * attention_macs(cfg, 1, attention_span(length, n * length,
                                                                          DENSE_BLOCK_TOKENS))
                elem = layers * h * n * length
                train.append((1, layers, 6 * macs * n * length, elem, t_step - t_opt))
                opt.append((1, P, t_opt))
                fwd.append((1, layers, 2 * macs * n * length, elem, _median(
                    lambda st=stage, mb=mb: infer(st, [mb], logprobs_call(1.0)))))
            for b in (4, 32, 128):
                prompts = torch.randint(1, 64, (b, 8), generator=g).tolist()

                def gen(steps, st=stage, prompts=prompts):
                    sp = generation.SamplingParams(max_new_tokens=steps, min_new_tokens=steps, top_k=0, seed=0)
                    return lambda: generation.generate(st, prompts, sp)
                dec.append((layers, 2 * P * b, b, (_median(gen(16), 3) - _median(gen(4), 3)) / 12))
    x, y = torch.empty(16 << 20), torch.empty(16 << 20)  # 64 MB each
    copy = [(x.numel() * 4, _median(lambda: y.copy_(x)))]
    return {"train": train, "fwd": fwd, "opt": opt, "dec": dec, "copy": copy}


def _rows_worker(threads: int, barrier, out) -> None:
    out.put(_measure_rows(threads, barrier))


def measure_cpu_rates(threads: int = 1, procs: int = 2) -> dict[str, float]:
    """The cost model's CPU terms, fitted to `_measure_rows` as ``procs`` processes measure them at
    once (one per core, as a run's ranks compute: a core runs ~1.4x slower while the other computes
    too), their seconds averaged row by row; then the gloo links (`measure_links`)."""
    import multiprocessing as mp

    from meshrl.engine.model.attention import DENSE_BLOCK_TOKENS
    barrier = mp.get_context("spawn").Barrier(procs)
    parts = _spawned(_rows_worker, [(threads, barrier)] * procs, results=procs, timeout=1200)
    rows = {k: [r[:-1] + (statistics.mean(p[k][i][-1] for p in parts),) for i, r in enumerate(v)]
            for k, v in parts[0].items()}
    train, fwd, opt, dec = rows["train"], rows["fwd"], rows["opt"], rows["dec"]
    out = {"dense_attention_block": DENSE_BLOCK_TOKENS}
    t = _fit(train, ["train_mb_s", "train_layer_s", "inv_rate", "train_elem_s"])
    out.update(train_mb_s=t["train_mb_s"], train_layer_s=t["train_layer_s"],
               train_elem_s=t["train_elem_s"],
               train_tflops=1e-12 / t["inv_rate"] if t["inv_rate"] else math.inf)
    f = _fit(fwd, ["fwd_mb_s", "fwd_layer_s", "inv_rate", "fwd_elem_s"])
    out.update(fwd_mb_s=f["fwd_mb_s"], fwd_layer_s=f["fwd_layer_s"], fwd_elem_s=f["fwd_elem_s"],
               fwd_tflops=1e-12 / f["inv_rate"] if f["inv_rate"] else math.inf)
    o = _fit(opt, ["opt_fixed_s", "opt_s_per_param"])
    out.update(o)
    # decode: what the flops at the forward rate do not explain is per-step, per-layer and
    # per-sequence (sampling, stop checks) overhead
    d = _fit([(1, layers, b, max(0.0, y - flops / (out["fwd_tflops"] * 1e12)))
              for layers, flops, b, y in dec], ["decode_step_s", "decode_layer_s", "decode_seq_s"])
    out.update(d)
    nbytes, t_copy = rows["copy"][0]
    out.update(copy_tbps=2 * nbytes / t_copy / 1e12, local_copy_gbps=nbytes / t_copy / 1e9)
    out.update(measure_links())
    return out


def calibrate(path: str | None = None, threads: int = 1, procs: int = 2) -> dict:
    """Measure the CPU rates and write them as ``devices.cpu`` of the rates file."""
    path = path or default_rates_path()
    values = measure_cpu_rates(threads, procs)
    with open(path) as f:
        doc = json.load(f)
    src = (f"meshrl.planning.bench --calibrate, {time.strftime('%Y-%m-%d')}, "
           f"{platform.machine()} {os.cpu_count()} cores, {procs} processes measuring at once, "
           f"{threads} torch thread(s) each, torch {torch.__version__}")
    doc["devices"]["cpu"] = {"aliases": [f"cpu-{platform.machine()}"], "doc": src,
                             **{k: {"value": v, "source": src} for k, v in sorted(values.items())}}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    return values


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="measure CPU rates for meshrl plan")
    ap.add_argument("--calibrate", action="store_true", required=True)
    ap.add_argument("--rates", help="rates file to update (default benchmarks/rates.json)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--procs", type=int, default=2,
                    help="processes measuring at once, one per core a run computes on (default 2)")
    a = ap.parse_args()
    print(json.dumps(calibrate(a.rates, a.threads, a.procs), indent=1))
