"""meshrl kernels against the peers' baselines, in one process.

    PYTHONPATH=. python benchmarks/fused_kernels.py            # real sizes on a GPU (about 2 minutes on an H100)
    PYTHONPATH=. python benchmarks/fused_kernels.py --small    # tiny sizes, seconds on CPU (smoke test)

One row per case: baseline time, meshrl time, speed-up, the physical floor (bytes over copy
bandwidth or FLOPs over the bf16 matmul ceiling, from benchmarks/anchors/h100.json) and meshrl's
fraction of it, and peak extra memory of each. On a GPU it also checks the Triton results against the
baseline at the real sizes and times a few block configurations of the log-prob kernels. Figures go
to benchmarks/results/kernels-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import anchor, bench_device, print_table, write_results  # noqa: E402
from meshrl.kernels import gae, linear_token_logprobs, logprobs_triton, token_logprobs  # noqa: E402

MiB = 2 ** 20


# --- baselines: what the peers do --------------------------------------------------------------------

def gae_loop(rewards, values, gamma, lam):
    """The per-timestep loop most RLHF libraries use, on padded [B, T] tensors."""
    last, rev = 0.0, []
    t_len = rewards.shape[1]
    for t in reversed(range(t_len)):
        next_v = values[:, t + 1] if t + 1 < t_len else 0.0
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        rev.append(last)
    adv = torch.stack(rev[::-1], 1)
    return adv, adv + values


def naive_logprobs(logits, labels, entropy):
    logp = torch.log_softmax(logits.float(), -1)
    out = logp.gather(1, labels[:, None]).squeeze(1)
    return (out, -(logp.exp() * logp).sum(-1)) if entropy else (out,)


def naive_linear(hidden, weight, labels):
    return naive_logprobs(hidden @ weight.T, labels, True)


# --- measurement -------------------------------------------------------------------------------------

class Meter:
    def __init__(self, device: torch.device):
        self.device = device
        self.gpu = device.type != "cpu"

    def time(self, fn) -> float:
        """Median seconds per call."""
        if self.gpu:
            import triton.testing
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        fn()
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs)

    def peak_extra(self, fn) -> float | None:
        """Peak bytes allocated by one call beyond what was live before it (GPU only)."""
        if not self.gpu:
            return None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return float(torch.cuda.max_memory_allocated() - before)


def row(name, base_s, mesh_s, floor_s, base_mem, mesh_mem, goal_s=None, goal_mem=None) -> dict:
    r = {"case": name, "baseline_ms": base_s * 1e3, "meshrl_ms": mesh_s * 1e3,
         "speedup": base_s / mesh_s, "floor_ms": floor_s * 1e3, "fraction_of_floor": floor_s / mesh_s,
         "baseline_peak_extra_MiB": None if base_mem is None else base_mem / MiB,
         "meshrl_peak_extra_MiB": None if mesh_mem is None else mesh_mem / MiB}
    if goal_s is not None:
        r["goal_ms"] = goal_s * 1e3
        r["meets_goal"] = mesh_s <= goal_s and (goal_mem is None or mesh_mem is None or mesh_mem <= goal_mem)
    return r


# --- cases -------------------------------------------------------------------------------------------

def bench_gae(m: Meter, b: int, t: int, bw: float, checks: list) -> list:
    g = torch.Generator(device=m.device).manual_seed(0)
    r = torch.randn(b, t, device=m.device, generator=g)
    v = torch.randn(b, t, device=m.device, generator=g)
    cu = torch.arange(0, (b + 1) * t, t, device=m.device, dtype=torch.int32)
    rp, vp = r.flatten(), v.flatten()
    base = m.time(lambda: gae_loop(r, v, 1.0, 0.95))
    mesh = m.time(lambda: gae(rp, vp, cu, gamma=1.0, lam=0.95))
    want = gae_loop(r, v, 1.0, 0.95)[0].flatten()
    got = gae(rp, vp, cu, gamma=1.0, lam=0.95)[0]
    checks.append(check("gae", got, want, atol=1e-3 * float(want.abs().max())))
    floor = b * t * 16 / (bw * 1e12)  # read r, v; write advantages, returns; fp32
    return [row(f"gae {b}x{t}", base, mesh, floor, m.peak_extra(lambda: gae_loop(r, v, 1.0, 0.95)),
                m.peak_extra(lambda: gae(rp, vp, cu, gamma=1.0, lam=0.95)), goal_s=12e-6)]


def bench_logprobs(m: Meter, n: int, v: int, bw: float, checks: list) -> list:
    g = torch.Generator(device=m.device).manual_seed(0)
    logits = (torch.randn(n, v, device=m.device, generator=g) * 2).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device=m.device, generator=g)
    read = n * v * logits.element_size() / (bw * 1e12)
    rows = []
    for entropy in (False, True):
        name = f"logprob{'+entropy' if entropy else ''} {n}x{v} bf16"
        base = m.time(lambda: naive_logprobs(logits, labels, entropy))
        mesh = m.time(lambda: token_logprobs(logits, labels, return_entropy=entropy))
        rows.append(row(name, base, mesh, read, m.peak_extra(lambda: naive_logprobs(logits, labels, entropy)),
                        m.peak_extra(lambda: token_logprobs(logits, labels, return_entropy=entropy)),
                        goal_s=0.85e-3 if entropy else None, goal_mem=64 * MiB if entropy else None))
    # Backward of log-prob + entropy: reads the logits, writes their gradient.
    up = [torch.randn(n, device=m.device, generator=g) for _ in range(2)]
    x = logits.clone().requires_grad_()
    base_out, mesh_out = naive_logprobs(x, labels, True), token_logprobs(x, labels, return_entropy=True)
    base_bwd = m.time(lambda: torch.autograd.grad(base_out, x, up, retain_graph=True))
    mesh_bwd = m.time(lambda: torch.autograd.grad(mesh_out, x, up, retain_graph=True))
    mesh_fwd = rows[-1]["meshrl_ms"] / 1e3
    rows.append(row(f"  backward of logprob+entropy {n}x{v}", base_bwd, mesh_bwd, 2 * read,
                    m.peak_extra(lambda: torch.autograd.grad(base_out, x, up, retain_graph=True)),
                    m.peak_extra(lambda: torch.autograd.grad(mesh_out, x, up, retain_graph=True)),
                    goal_s=2 * mesh_fwd))
    for i, what in enumerate(("logprob", "entropy")):
        checks.append(check(f"{what} {n}x{v}", mesh_out[i], base_out[i], atol=2e-3))
    (g_base,) = torch.autograd.grad(base_out, x, up, retain_graph=True)
    (g_mesh,) = torch.autograd.grad(mesh_out, x, up, retain_graph=True)
    checks.append(check(f"d logits {n}x{v}", g_mesh, g_base, atol=2e-2 * float(g_base.abs().max())))
    return rows


def bench_linear(m: Meter, n: int, h: int, v: int, tflops: float, checks: list) -> list:
    g = torch.Generator(device=m.device).manual_seed(0)
    hidden = torch.randn(n, h, device=m.device, generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, h, device=m.device, generator=g) / h ** 0.5).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device=m.device, generator=g)
    floor = 2 * n * h * v / (tflops * 1e12)
    base = m.time(lambda: naive_linear(hidden, weight, labels))
    mesh = m.time(lambda: linear_token_logprobs(hidden, weight, labels, return_entropy=True))
    rows = [row(f"hidden->logprob+entropy {n}x{h}x{v} bf16", base, mesh, floor,
                m.peak_extra(lambda: naive_linear(hidden, weight, labels)),
                m.peak_extra(lambda: linear_token_logprobs(hidden, weight, labels, return_entropy=True)),
                goal_s=25e-3, goal_mem=1024 * MiB)]
    hx, wx = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    up = [torch.randn(n, device=m.device, generator=g) for _ in range(2)]
    base_out = naive_linear(hx, wx, labels)
    mesh_out = linear_token_logprobs(hx, wx, labels, return_entropy=True)
    base_bwd = m.time(lambda: torch.autograd.grad(base_out, (hx, wx), up, retain_graph=True))
    mesh_bwd = m.time(lambda: torch.autograd.grad(mesh_out, (hx, wx), up, retain_graph=True))
    rows.append(row("  backward of hidden->logprob+entropy", base_bwd, mesh_bwd, 3 * floor, None,
                    m.peak_extra(lambda: torch.autograd.grad(mesh_out, (hx, wx), up, retain_graph=True))))
    for i, what in enumerate(("logprob", "entropy")):
        checks.append(check(f"linear {what}", mesh_out[i], base_out[i], atol=5e-2))
    gb = torch.autograd.grad(base_out, (hx, wx), up, retain_graph=True)
    gm = torch.autograd.grad(mesh_out, (hx, wx), up, retain_graph=True)
    for what, a, b in zip(("d hidden", "d weight"), gm, gb):
        checks.append(check(f"linear {what}", a, b, atol=3e-2 * float(b.abs().max())))
    return rows


def sweep_logprob_blocks(m: Meter, n: int, v: int) -> list:
    """Times the log-prob kernels over block configurations, to tune the defaults."""
    g = torch.Generator(device=m.device).manual_seed(1)
    logits = (torch.randn(n, v, device=m.device, generator=g) * 2).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device=m.device, generator=g)
    lse, ent, glp, gent = (torch.randn(n, device=m.device, generator=g) for _ in range(4))
    out = []
    for block, warps in [(2048, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16), (32768, 32)]:
        fwd = m.time(lambda: logprobs_triton.row_stats(logits, labels, 1.0, 0, v, finalize=True,
                                                       block=block, num_warps=warps))
        bwd = m.time(lambda: logprobs_triton.logits_grad(logits, labels, lse, ent, glp, gent, 1.0, 0, v,
                                                         block=block, num_warps=warps))
        out.append({"block": block, "num_warps": warps, "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3})
        print(f"  sweep block={block:6d} warps={warps:2d}  fwd {fwd * 1e3:7.3f} ms  bwd {bwd * 1e3:7.3f} ms")
    return out


def torch_path_checks(m: Meter, n: int, v: int, n_seq: int = 300, max_len: int = 2048) -> list:
    """On GPU, the Triton kernels against meshrl's own torch path (MESHRL_KERNELS=torch)."""
    g = torch.Generator(device=m.device).manual_seed(2)
    logits = (torch.randn(n, v, device=m.device, generator=g) * 2).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device=m.device, generator=g)
    lens = torch.randint(1, max_len, (n_seq,), device=m.device, generator=g)
    cu = torch.zeros(n_seq + 1, dtype=torch.int32, device=m.device)
    cu[1:] = lens.cumsum(0)
    r, val = (torch.randn(int(cu[-1]), device=m.device, generator=g) for _ in range(2))
    boot = torch.randn(n_seq, device=m.device, generator=g)
    runs = {}
    for path in ("triton", "torch"):
        os.environ["MESHRL_KERNELS"] = path
        try:
            runs[path] = (token_logprobs(logits, labels, return_entropy=True),
                          gae(r, val, cu, bootstrap_values=boot, gamma=0.99, lam=0.95))
        finally:
            del os.environ["MESHRL_KERNELS"]
    (lp, ent), (adv, _) = runs["triton"]
    (lp_t, ent_t), (adv_t, _) = runs["torch"]
    return [check("logprob vs torch path", lp, lp_t, atol=1e-4),
            check("entropy vs torch path", ent, ent_t, atol=1e-4),
            check("gae vs torch path (ragged)", adv, adv_t, atol=1e-4 * float(adv_t.abs().max()))]


def check(name, got, want, atol) -> dict:
    err = float((got.detach().float() - want.detach().float()).abs().max())
    ok = err <= atol and bool(torch.isfinite(got).all())
    print(f"  check {name:28s} max|err| {err:.3g} (allowed {atol:.3g}) {'ok' if ok else 'FAIL'}")
    return {"name": name, "max_abs_err": err, "atol": atol, "ok": ok}


COLUMNS = ["case", "baseline_ms", "meshrl_ms", "speedup", "floor_ms", "fraction_of_floor",
           "baseline_peak_extra_MiB", "meshrl_peak_extra_MiB", "goal_ms", "meets_goal"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes (the default without a GPU)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the block-size sweep on GPU")
    args = ap.parse_args()
    device = bench_device()
    m = Meter(device)
    small = args.small or not m.gpu
    bw, tflops = anchor("copy_bw", "TBps", 3.0), anchor("bf16_matmul", "TFLOPs", 769.0)
    gae_bt, lp_nv, lin_nhv = ((16, 64), (256, 1000), (256, 128, 1000)) if small else \
        ((512, 1024), (8192, 128256), (8192, 8192, 128256))
    print(f"device: {device}  torch {torch.__version__}  floors: {bw:.2f} TB/s, {tflops:.0f} TFLOP/s")
    checks: list = []
    rows = bench_gae(m, *gae_bt, bw, checks)
    rows += bench_logprobs(m, *lp_nv, bw, checks)
    rows += bench_linear(m, *lin_nhv, tflops, checks)
    if m.gpu:
        checks += torch_path_checks(m, *lp_nv)
    sweep = sweep_logprob_blocks(m, *lp_nv) if m.gpu and not args.no_sweep else []
    if small:  # the goals are for the real sizes on an H100
        for r in rows:
            r.pop("goal_ms", None), r.pop("meets_goal", None)
    print()
    print_table(rows, COLUMNS)
    path = write_results("kernels", device, rows, {"small": small, "floors": {"TBps": bw, "TFLOPs": tflops},
                                                   "checks": checks, "logprob_block_sweep": sweep})
    print(f"wrote {path}")
    if not all(c["ok"] for c in checks):
        raise SystemExit("correctness check failed")


if __name__ == "__main__":
    main()
