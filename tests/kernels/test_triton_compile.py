"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU.

The interpreter checks the arithmetic, not what the compiler accepts (loop-carried types, constexpr
globals, scan combine functions); compiling ahead of time catches those here instead of on a lent GPU.
"""
import os
import time

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from meshrl.kernels.gae import _gae_kernel
from meshrl.kernels import logprobs_triton as lt

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="kernels are interpreted functions in this process")

H100 = GPUTarget("cuda", 90, 32)


def _compile(fn, signature, constexprs, num_warps):
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    return triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=H100,
                          options={"num_warps": num_warps})


@pytest.mark.parametrize("has_boot", [False, True])
def test_gae_kernel_compiles(has_boot):
    sig = {"r_ptr": "*fp32", "v_ptr": "*bf16", "boot_ptr": "*fp32", "cu_ptr": "*i32",
           "adv_ptr": "*fp32", "ret_ptr": "*fp32", "gamma": "fp32", "gamma_lam": "fp32"}
    k = _compile(_gae_kernel, sig, {"HAS_BOOT": has_boot, "BLOCK": 1024}, 4)
    assert "cubin" in k.asm


@pytest.mark.parametrize("finalize", [False, True])
def test_logprob_stats_kernel_compiles(finalize):
    sig = {"x_ptr": "*bf16", "lab_ptr": "*i64", "o0_ptr": "*fp32", "o1_ptr": "*fp32",
           "o2_ptr": "*fp32", "o3_ptr": "*fp32", "stride": "i64", "n_valid": "i32", "offset": "i32",
           "scale": "fp32"}
    t0 = time.perf_counter()
    k = _compile(lt._stats_kernel, sig, {"FINALIZE": finalize, "BLOCK": 8192, "N_BLOCKS": 16}, 16)
    assert "cubin" in k.asm
    assert time.perf_counter() - t0 < 60


def test_logprob_grad_kernel_compiles():
    sig = {"x_ptr": "*bf16", "lab_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
           "glp_ptr": "*fp32", "gent_ptr": "*fp32", "gx_ptr": "*bf16", "stride": "i64",
           "g_stride": "i64", "n_valid": "i32", "n_cols": "i32", "offset": "i32", "scale": "fp32",
           "inv_t": "fp32"}
    k = _compile(lt._grad_kernel, sig, {"BLOCK": 8192, "N_BLOCKS": 16}, 16)
    assert "cubin" in k.asm
