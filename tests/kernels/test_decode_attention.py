"""Decode attention over a static KV cache (meshrl/kernels/decode_attention.py): the torch path and the
Triton kernel (interpreted, in a child process) against the float64 oracle, with rotary embeddings
inside, sliding windows and split programs; the kernel compiles for sm_90 without register spills;
the split count and launch settings are checked."""
import os
import subprocess

import pytest
import torch
from oracles import decode_attention_oracle

from meshrl.engine.model.attention import rope_cos_sin
from meshrl.kernels.decode_attention import attend, kernel_meta, rotate
from meshrl.testing.triton_interpreter import run_interpreted

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


ATTN_CASES = [(3, 4, 2, 16, 80, [0, 5, 79], None), (2, 8, 2, 24, 130, [70, 129], None),
              (2, 4, 4, 16, 100, [50, 99], 7), (2, 6, 2, 16, 70, [3, 66], 64)]


def _attention_inputs(dtype, b, hq, hkv, d, cap, lengths):
    g = torch.Generator().manual_seed(b * cap)
    t = [torch.randn(s, generator=g).to(dtype) for s in
         [(b, hq, d), (b, hkv, d), (b, hkv, d), (b, hkv, cap, d), (b, hkv, cap, d)]]
    return (*t, torch.tensor(lengths))


def _rope_tables(d, lengths, dtype):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    return rope_cos_sin(inv_freq, lengths, dtype)


def _rotated_oracle(q, kn, vn, kc, vc, n, window, rope):
    """The oracle on q and the new key rotated in float64 (the caches get the rotated key)."""
    if rope is not None:
        cos, sin = (t.double() for t in rope)
        q, kn = rotate(q.double(), cos, sin), rotate(kn.double(), cos, sin).to(kn.dtype)
    return decode_attention_oracle(q, kn, vn, kc, vc, n, window=window)


@pytest.mark.parametrize("rotate", [False, True])
def test_attention_torch_path_matches_oracle(rotate):
    for b, hq, hkv, d, cap, lengths, window in ATTN_CASES:
        q, kn, vn, kc, vc, n = _attention_inputs(torch.float32, b, hq, hkv, d, cap, lengths)
        rope = _rope_tables(d, n, torch.float32) if rotate else None
        k2, v2 = kc.clone(), vc.clone()
        got = attend(q, kn, vn, kc, vc, n, window=window, backend="torch", rope=rope)
        want = _rotated_oracle(q, kn, vn, k2, v2, n, window, rope)
        assert torch.allclose(kc, k2, atol=1e-6) and torch.equal(vc, v2)
        assert torch.allclose(got.double(), want, atol=1e-5)


@pytest.mark.skipif(not INTERPRETING, reason="run by test_triton_attention_interpreted")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotate", [False, True])
def test_interpreted_triton_attention(dtype, rotate):
    from meshrl.kernels.decode_attention import attend_triton
    for b, hq, hkv, d, cap, lengths, window in ATTN_CASES:
        q, kn, vn, kc, vc, n = _attention_inputs(dtype, b, hq, hkv, d, cap, lengths)
        rope = _rope_tables(d, n, dtype) if rotate else None
        k2, v2 = kc.clone(), vc.clone()
        got = attend_triton(q, kn, vn, kc, vc, n, window=window, rope=rope)
        want = _rotated_oracle(q, kn, vn, k2, v2, n, window, rope)
        # the new key/value were appended (rotated in fp32 and rounded once: one bf16 ulp apart)
        key_tol = 0 if not rotate else (1e-6 if dtype == torch.float32 else 2e-2)
        assert torch.allclose(kc.double(), k2.double(), atol=key_tol, rtol=0) and torch.equal(vc, v2)
        # bf16: output rounding and probabilities rounded to bf16 before the value product
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert torch.allclose(got.double(), want, atol=tol), (got.double() - want).abs().max()


# Longer caches, so splits get several blocks each: a window inside one split, lengths on and just
# past block edges, and more splits than a sequence has blocks (those splits are empty).
SPLIT_CASES = ATTN_CASES + [(2, 4, 2, 16, 300, [64, 299], None), (3, 4, 1, 16, 400, [128, 300, 399], 100),
                            (1, 2, 2, 16, 200, [65], 3), (2, 3, 1, 24, 1100, [1029, 700], 300)]


@pytest.mark.skipif(not INTERPRETING, reason="run by test_triton_attention_interpreted")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_split_attention(dtype):
    from meshrl.kernels.decode_attention import attend_triton
    for i, (b, hq, hkv, d, cap, lengths, window) in enumerate(SPLIT_CASES):
        q, kn, vn, kc, vc, n = _attention_inputs(dtype, b, hq, hkv, d, cap, lengths)
        if i == len(SPLIT_CASES) - 1 and dtype == torch.float32:
            q = q * 100  # scores far apart: a split's max passes split 0's by > 88 (e^88 overflows)
        rope = _rope_tables(d, n, dtype)
        k2, v2 = kc.clone(), vc.clone()
        want = _rotated_oracle(q, kn, vn, k2, v2, n, window, rope)
        one = attend_triton(q, kn, vn, kc.clone(), vc.clone(), n, window=window, rope=rope, splits=1)
        for splits in (2, 3, 7, 16):
            k1, v1 = kc.clone(), vc.clone()
            got = attend_triton(q, kn, vn, k1, v1, n, window=window, rope=rope, splits=splits)
            # the new key/value are appended (by split 0 alone) as the oracle appends them
            key_tol = 1e-6 if dtype == torch.float32 else 2e-2
            assert torch.allclose(k1.double(), k2.double(), atol=key_tol, rtol=0)
            assert torch.equal(v1, v2)
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            assert torch.allclose(got.double(), want, atol=tol), (splits, (got.double() - want).abs().max())
            # the merge only reorders fp32 sums (bf16: probabilities are rounded against each
            # split's own running max, so a few output ulps): close to the unsplit kernel
            close = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=8e-3, rtol=2 ** -7)
            assert torch.allclose(got.float(), one.float(), **close), (got.float() - one.float()).abs().max()
        for block_n in (32, 128):  # FastOptions(attention_block=): other blocks per loop step
            got = attend_triton(q, kn, vn, kc.clone(), vc.clone(), n, window=window, rope=rope,
                                splits=3, block_n=block_n, num_warps=2)
            # fp32 scores in the hundreds (the scaled case) carry ~1e-5 of rounding into each weight
            tol = (1e-4 if i == len(SPLIT_CASES) - 1 else 1e-5) if dtype == torch.float32 else 3e-2
            assert torch.allclose(got.double(), want, atol=tol), (block_n, (got.double() - want).abs().max())


def test_triton_attention_interpreted():
    run_interpreted(__file__, "interpreted_", 6)


@pytest.mark.skipif(INTERPRETING, reason="kernels are interpreted functions in this process")
@pytest.mark.parametrize("dtype,window,rope,splits", [(torch.bfloat16, None, True, 1),
                                                      (torch.bfloat16, 4096, True, 1),
                                                      (torch.bfloat16, None, False, 1),
                                                      (torch.float32, None, True, 1),
                                                      (torch.bfloat16, None, True, 4),
                                                      (torch.bfloat16, 4096, True, 3)])
def test_triton_attention_compiles_for_sm90(dtype, window, rope, splits):
    from meshrl.kernels.decode_attention import COMBINE_META
    from meshrl.kernels.decode_attention import _combine_kernel as combine
    from meshrl.kernels.decode_attention import _decode_attention_kernel as kernel
    ty = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    ptrs = ("q_ptr", "kn_ptr", "vn_ptr", "kc_ptr", "vc_ptr", "o_ptr", "cos_ptr", "sin_ptr")
    sig = {n: "i32" for n in kernel.arg_names if n.startswith("s") and n != "scale"}
    sig.update({n: ty for n in ptrs})
    sig.update(len_ptr="*i64", acc_ptr="*fp32", ml_ptr="*fp32", scale="fp32", window="i32")
    q, kc = torch.empty(1, 32, 64, dtype=dtype), torch.empty(1, 8, 1, 64, dtype=dtype)
    meta = kernel_meta(q, kc, window, rope, splits)
    assert "cubin" in _compile_sm90(kernel, sig, meta).asm
    if splits > 1:  # the merge of the splits' partials
        sig = dict(acc_ptr="*fp32", ml_ptr="*fp32", o_ptr=ty, so_b="i32", so_h="i32")
        assert "cubin" in _compile_sm90(combine, sig, {k: meta[k] for k in COMBINE_META}).asm


def _compile_sm90(kernel, sig, constexprs):
    """The kernel built for an H100 as a launch builds it: the JIT specialises pointers (16-byte
    aligned) and integer arguments divisible by 16, which lets it vectorise the cache loads."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {n: sig.get(n, "constexpr") for n in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
               if sig[n].startswith("*") or n in ("sc_b", "sc_h", "sc_n")}
    built = triton.compile(ASTSource(kernel, sig, constexprs=constexprs, attrs=aligned),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    usage = _resource_usage(built.asm["cubin"])
    assert usage["LOCAL"] == 0, usage  # no register spills
    return built


def _resource_usage(cubin: bytes) -> dict:
    import os
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in (f.split(":") for f in line.split() if f.split(":")[-1].isdigit())}


def test_split_count_fills_the_gpu_and_no_more():
    from meshrl.kernels.decode_attention import MAX_SPLITS, choose_splits
    assert choose_splits(programs=64 * 8, capacity=384, sm_count=132) == 1  # the 1.1B decode case
    assert choose_splits(programs=8 * 8, capacity=4096, sm_count=132) == 5  # 64 → 320 programs
    assert choose_splits(programs=1, capacity=1 << 16, sm_count=132) == MAX_SPLITS
    assert choose_splits(programs=8, capacity=200, sm_count=132) == 1  # no split without 2 blocks each
    assert choose_splits(programs=8, capacity=512, sm_count=132) == 4


def test_split_count_is_checked():
    from meshrl.kernels.decode_attention import attend_triton
    q, kn, vn, kc, vc, n = _attention_inputs(torch.float32, 1, 2, 1, 16, 8, [3])
    with pytest.raises(ValueError, match="attention splits=0: use 1 to 16"):
        attend_triton(q, kn, vn, kc, vc, n, splits=0)
    with pytest.raises(ValueError, match="attention window=0: a sliding window holds at least 1"):
        attend_triton(q, kn, vn, kc, vc, n, window=0)
    with pytest.raises(ValueError, match="attention num_warps=3: use 1, 2, 4, 8 or 16"):
        attend_triton(q, kn, vn, kc, vc, n, num_warps=3)
