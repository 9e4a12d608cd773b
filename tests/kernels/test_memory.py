"""Memory rules of the torch path, measured from the CPU allocator's events.

torch.profiler(profile_memory=True) records every CPU allocation and free with its size; replaying
them in time order gives the peak of live bytes allocated inside the measured call. A naive
implementation is measured the same way, so a broken measurement would fail the control assertion
rather than pass everything.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from meshrl.kernels import linear_token_logprobs, token_logprobs


def peak_bytes(fn):
    """(peak live bytes allocated during fn(), fn's result)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, out


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    monkeypatch.setenv("MESHRL_KERNELS", "torch")


N, V = 2048, 32000
FULL_FP32 = N * V * 4  # 262 MB: what a materialised fp32 log-softmax costs


def _logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, V, generator=g).to(torch.bfloat16), torch.randint(0, V, (N,), generator=g)


def test_control_naive_log_softmax_is_caught():
    logits, labels = _logits()

    def naive():
        logp = torch.log_softmax(logits.float(), -1)
        return logp.gather(1, labels[:, None]), -(logp.exp() * logp).sum(-1)

    peak, _ = peak_bytes(naive)
    assert peak >= FULL_FP32


def test_token_logprobs_forward_and_backward_hold_no_fp32_nxv():
    logits, labels = _logits()
    x = logits.clone().requires_grad_()
    peak_fwd, (lp, ent) = peak_bytes(lambda: token_logprobs(x, labels, return_entropy=True))
    # Chunk temporaries only (16 MiB fp32 each, a handful at once): far below one fp32 N×V.
    assert peak_fwd < FULL_FP32 / 4, peak_fwd
    peak_bwd, _ = peak_bytes(lambda: (lp + ent).sum().backward())
    grad_bytes = N * V * logits.element_size()  # the gradient itself is allowed
    assert peak_bwd < grad_bytes + FULL_FP32 / 4, (peak_bwd, grad_bytes)


def test_linear_token_logprobs_holds_one_chunk_of_logits():
    n, h, v, chunk = 1024, 64, 16000, 1 << 19
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    chunk_bytes = chunk * 4
    full_logits = n * v * 4  # 65 MB: 32 chunks of [128, 4096]
    peak_fwd, (lp, ent) = peak_bytes(lambda: linear_token_logprobs(
        hidden, weight, labels, return_entropy=True, max_chunk_elems=chunk))
    # One logits chunk plus the torch path's copies of it (fp32 z, exp, mask) and [4, N] partials.
    assert peak_fwd < 5 * chunk_bytes, (peak_fwd, chunk_bytes)
    peak_bwd, _ = peak_bytes(lambda: (lp + ent).sum().backward())
    grads = (n * h + v * h) * 4 + n * h * 4  # both gradients plus the fp32 hidden accumulator
    assert peak_bwd < grads + 6 * chunk_bytes, (peak_bwd, grads, chunk_bytes)
    assert peak_bwd < full_logits / 2
