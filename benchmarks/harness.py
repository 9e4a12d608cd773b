"""Shared benchmark plumbing: device choice, timing, peak memory, anchors and result files."""
from __future__ import annotations

import json
import os
import platform
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ANCHORS = os.path.join(HERE, "anchors", "h100.json")
RESULTS = os.path.join(HERE, "results")


def bench_device() -> torch.device:
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return torch.device(acc) if acc is not None else torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return f"cpu-{platform.machine()}"
    return torch.cuda.get_device_name(device).replace(" ", "-")


def synchronize(device):
    if device.type != "cpu":
        torch.accelerator.synchronize()


def time_fn(fn, device, *, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call, device work included."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def reset_peak(device):
    if device.type != "cpu":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def peak_extra_gib(device, base: int) -> float:
    if device.type == "cpu":
        return float("nan")
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def anchor(name: str, field: str, default=None):
    try:
        with open(ANCHORS) as f:
            for row in json.load(f):
                if row.get("name") == name:
                    return row.get(field, default)
    except FileNotFoundError:
        pass
    return default


def write_results(stem: str, device: torch.device, rows: list[dict], extra: dict | None = None) -> str:
    folder = os.environ.get("MESHRL_BENCH_RESULTS") or RESULTS  # tests write elsewhere
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{stem}-{device_name(device)}.json")
    payload = {"device": device_name(device), "torch": torch.__version__,
               "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, **(extra or {})}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def print_table(rows: list[dict], cols: list[str]):
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
