"""Per-GPU rates for the cost model, read from benchmark results committed in the repository.

``benchmarks/rates.json`` names, per device, where each rate comes from: a row of a committed
result file, a list of such rows (the first that resolves wins, so a newer benchmark can take over
when its result is committed), or a value with its source (the CPU calibration that
``meshrl.planning.bench --calibrate`` measures, and the few figures no benchmark here
measures, marked as assumed). ``$MESHRL_RATES`` or an argument points elsewhere.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

RATES_ENV = "MESHRL_RATES"


class RatesError(ValueError):
    """A rates file that cannot be read; the message names the file, the key and the fix."""


# ---- rates ------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Rates:
    """Per-GPU rates of one device. Overhead terms are 0 where the benchmark folds them into a rate."""
    device: str
    train_tflops: float
    fwd_tflops: float
    copy_tbps: float
    opt_s_per_param: float
    local_copy_gbps: float
    latency_s: float
    decode_layer_s: float = 0.0   # per layer per decoding step (launches, sampling glue)
    decode_step_s: float = 0.0    # per decoding step
    decode_seq_s: float = 0.0     # per sequence per decoding step (sampling; every tp rank samples)
    train_layer_s: float = 0.0    # per layer per microbatch
    train_mb_s: float = 0.0       # per microbatch
    fwd_layer_s: float = 0.0
    fwd_mb_s: float = 0.0
    # per token, layer and hidden unit: the elementwise work (norms, residuals, rotary, activations)
    # every tensor-parallel rank repeats over all its tokens (CPU; folded into the rates on GPU)
    train_elem_s: float = 0.0
    fwd_elem_s: float = 0.0
    opt_fixed_s: float = 0.0
    link_gbps: float | None = None  # replaces the cluster's link rates (CPU: gloo, measured)
    # tokens per dense attention block (CPU: SDPA over blocks of whole sequences, every token
    # reading its block's keys); 0: a causal kernel per sequence (GPU)
    dense_attention_block: int = 0
    sources: dict = field(default_factory=dict)


def default_rates_path() -> str:
    env = os.environ.get(RATES_ENV)
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "benchmarks", "rates.json"))


def _rows(doc):
    return doc["rows"] if isinstance(doc, dict) and "rows" in doc else doc


def _resolve(ref, base: str, path: str, key: str):
    """A number, {"value": v, "source": s}, {"file", "case"|"case_startswith"|"name", "field"} (a
    row's field), {"file", "field"} (a field of the whole result), or a list of those: the first
    that resolves wins (a result not committed yet, or with other fields, falls through). Returns
    (value, provenance)."""
    if isinstance(ref, (int, float)):
        return float(ref), os.path.basename(path)
    if isinstance(ref, list):
        why = []
        for r in ref:
            try:
                return _resolve(r, base, path, key)
            except RatesError as e:
                why.append(str(e))
        raise RatesError(f"{path}: {key}: no entry resolves ({'; '.join(why)})")
    if "value" in ref:
        return float(ref["value"]), ref.get("source", os.path.basename(path))
    fpath = os.path.join(base, ref["file"])
    try:
        with open(fpath) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise RatesError(f"{path}: {key}: {fpath} does not exist: commit the benchmark result "
                         "or point the rate elsewhere") from None
    try:
        if "with" in ref:  # optimizer: the difference of two rows, per parameter
            secs = {r.get("case"): r["seconds"] for r in _rows(doc)}
            v = (secs[ref["with"]] - secs[ref["without"]]) / doc["params"]
            return v, f"{ref['file']}: ('{ref['with']}' - '{ref['without']}') / params"
        if not {"case", "case_startswith", "name"} & set(ref):
            return float(doc[ref["field"]]), f"{ref['file']}: {ref['field']}"
        for r in _rows(doc):
            if ("case" in ref and r.get("case") == ref["case"]
                    or "case_startswith" in ref and str(r.get("case", "")).startswith(ref["case_startswith"])
                    or "name" in ref and r.get("name") == ref["name"]):
                return float(r[ref["field"]]), f"{ref['file']}: {r.get('case', r.get('name'))}"
    except (KeyError, TypeError) as e:
        raise RatesError(f"{path}: {key}: {fpath} lacks {e}") from None
    raise RatesError(f"{path}: {key}: no matching row in {fpath}")


def load_rates(device: str, path: str | None = None) -> Rates:
    """The rates of ``device`` (a name in the file or one of its aliases)."""
    path = path or default_rates_path()
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise RatesError(f"rates file {path} not found: pass --rates or set {RATES_ENV}") from None
    devices = doc["devices"]
    name = next((n for n, d in devices.items()
                 if device.lower() in [n.lower()] + [a.lower() for a in d.get("aliases", [])]), None)
    if name is None:
        raise RatesError(f"{path}: no rates for device '{device}': use one of {', '.join(devices)}")
    entry, base = devices[name], os.path.dirname(path)
    vals, src = {}, {}
    for key, ref in entry.items():
        if key in ("aliases", "doc", "decode"):
            continue
        vals[key], src[key] = _resolve(ref, base, path, f"devices.{name}.{key}")
    if "decode" in entry:  # per-layer step overhead = measured step − its weight-read floor
        d = entry["decode"]
        at = f"devices.{name}.decode"
        tps, src["decode_layer_s"] = _resolve(d["tokens_per_s"], base, path, at)
        shape = {k: _resolve(d[k], base, path, f"{at}.{k}")[0] for k in ("params", "layers", "batch")}
        floor = shape["params"] * d["bytes_per_param"] / (vals["copy_tbps"] * 1e12)
        vals["decode_layer_s"] = max(0.0, shape["batch"] / tps - floor) / shape["layers"]
    try:
        return Rates(device=name, sources=src, **vals)
    except TypeError as e:
        raise RatesError(f"{path}: devices.{name}: {e}") from None
