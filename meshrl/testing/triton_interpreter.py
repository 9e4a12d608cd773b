"""Running test cases under the Triton interpreter in a child pytest.

TRITON_INTERPRET must be set before kernels are decorated (at import), and a test process has
imported them compiled already, so a fresh process is the reliable way in."""
from __future__ import annotations

import os
import subprocess
import sys


def run_interpreted(path: str, keyword: str, passed: int, *, timeout: int = 600) -> str:
    """The tests of ``path`` whose names contain ``keyword``, interpreted, one thread; asserts they
    all passed and were ``passed`` in number (none skipped unseen). Returns pytest's output."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path,
                           "-k", keyword], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert f"{passed} passed" in proc.stdout, proc.stdout[-2000:]
    return proc.stdout
