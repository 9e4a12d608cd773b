"""Runs interpret_cases.py in a child pytest with the Triton interpreter switched on.

TRITON_INTERPRET must be set before the kernels are decorated (at import), and this process has
imported them compiled already, so a fresh process is the reliable way in.
"""
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def test_triton_kernels_match_oracles_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", MESHRL_KERNELS="triton", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
         str(HERE / "interpret_cases.py")],
        env=env, cwd=HERE.parent.parent, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
