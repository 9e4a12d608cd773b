"""Run untrusted Python programs (code-reward candidates) under limits.

Each run: a fresh directory; a launcher process in a new session (`_sandbox_child.py`) that, as root,
enters new network, mount and pid namespaces, remounts every filesystem read-only in its namespace and
gives the candidate a size-capped tmpfs as working directory, then starts the candidate as an
unprivileged user with rlimits (CPU, address space, file size, processes, open files, no core dumps) and
no_new_privs. The parent talks to it through stdin/stdout/stderr pipes only, caps what it reads, keeps
a wall-clock deadline, kills the whole process group at the end and removes the directory.

The unprivileged user is by default a fresh uid per run (from `PRIVATE_UID_RANGE`, no passwd entry
needed): RLIMIT_NPROC counts processes per uid over the whole machine, so with a shared user such as
nobody a fork bomb in one sandbox would make concurrent, innocent sandboxes fail to start. Pass
`uid=65534` for nobody.

Without root (or without the capability to unshare, as in a default Docker container) the run still
gets rlimits and the launcher kills every descendant of the candidate at the end, and a warning says
which protections are missing; without a mount namespace the working directory is an ordinary
directory, so only RLIMIT_FSIZE (per file) bounds what the candidate writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import select
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping

PRIVATE_UID_RANGE = (2_000_000_000, 2_100_000_000)  # below 2**31: some tools treat uids as signed
_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
_FULL_PROTECTIONS = ("netns", "mountns", "pidns", "readonly", "tmpfs", "uid")
# Time the launcher may need beyond the candidate's wall limit (its own start, reaping) before the
# parent stops trusting it and kills its process group itself.
_LAUNCHER_GRACE_S = 5.0


class SandboxError(RuntimeError):
    """The sandbox could not be set up (not: the candidate failed)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    cpu_seconds: float = 4.0           # RLIMIT_CPU per process (soft; SIGKILL one second later)
    wall_seconds: float = 10.0         # whole run, enforced by the launcher
    memory_bytes: int = 1 << 30        # RLIMIT_AS per process
    file_size_bytes: int = 16 << 20    # RLIMIT_FSIZE: largest file the candidate may write
    disk_bytes: int = 64 << 20         # size of the tmpfs working directory (all files together)
    processes: int = 32                # RLIMIT_NPROC for the sandbox uid (threads count too)
    open_files: int = 64               # RLIMIT_NOFILE
    output_bytes: int = 1 << 20        # stdout (and, separately, stderr) kept; more fails the run


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    returncode: int | None             # 128+N when killed by signal N; None when timed out
    stdout: bytes
    stderr: bytes
    timed_out: bool
    output_truncated: bool
    uid: int | None                    # the uid the candidate ran as (None: not dropped)
    protections: tuple[str, ...]       # what was in force: netns, mountns, pidns, readonly, tmpfs, uid
    wall_seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


def _reachable_by_others(path: str, need: int) -> bool:
    """Whether a user with no ownership or group ties can reach `path` with permission bits `need`."""
    path = os.path.realpath(path)
    try:
        if os.stat(path).st_mode & need != need:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def default_python() -> str:
    """An interpreter an unprivileged user can run: this one when its files are reachable, else python3.

    Interpreters installed under /root (pyenv, conda) are invisible to other users.
    """
    stdlib = os.path.dirname(os.__file__)
    if (_reachable_by_others(sys.executable, stat.S_IXOTH | stat.S_IROTH)
            and _reachable_by_others(stdlib, stat.S_IXOTH | stat.S_IROTH)):
        return sys.executable
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if system and _reachable_by_others(system, stat.S_IXOTH | stat.S_IROTH):
        return system
    raise SandboxError(f"no Python interpreter usable by an unprivileged user: {sys.executable} (or its "
                       f"standard library) is not world-readable and there is no system python3; "
                       f"pass Sandbox(python=...)")


class Sandbox:
    """Runs Python programs under the limits of `limits`; thread-safe, one directory per run."""

    def __init__(self, limits: SandboxLimits | None = None, *, python: str | None = None,
                 uid: int | None = None, gid: int | None = None, namespaces: bool = True,
                 tmp_root: str | None = None):
        self.limits = limits or SandboxLimits()
        self.is_root = os.geteuid() == 0
        self.python = python or (default_python() if self.is_root else sys.executable)
        self.uid, self.gid = uid, gid
        self.namespaces = namespaces
        self.tmp_root = tmp_root or tempfile.gettempdir()
        # Python opens its script by absolute path, so every directory above the run's must be searchable.
        if self.is_root and not _reachable_by_others(self.tmp_root, stat.S_IXOTH):
            raise SandboxError(f"sandbox: tmp_root {self.tmp_root} is not searchable by other users "
                               f"(some directory on its path lacks o+x); choose another")

    def _pick_user(self) -> tuple[int | None, int | None]:
        if not self.is_root:
            return None, None
        if self.uid is not None:
            return self.uid, self.gid if self.gid is not None else self.uid
        lo, hi = PRIVATE_UID_RANGE
        uid = lo + secrets.randbelow(hi - lo)
        return uid, uid

    def run(self, files: Mapping[str, str | bytes], main: str, stdin: bytes | str = b"") -> SandboxResult:
        """Run `python -I -B main` with `files` (name -> content) in its working directory."""
        if main not in files:
            raise ValueError(f"sandbox: main program {main!r} is not among the files {sorted(files)}")
        root = tempfile.mkdtemp(prefix="meshrl-sbx-", dir=self.tmp_root)
        try:
            os.chmod(root, 0o711)  # the sandbox user must traverse it to reach its working directory
            os.mkdir(os.path.join(root, "box"))
            os.mkdir(os.path.join(root, "src"), 0o700)
            for name, content in files.items():
                if os.path.basename(name) != name or name in ("", ".", ".."):
                    raise ValueError(f"sandbox: file name {name!r} must be a plain name")
                data = content.encode() if isinstance(content, str) else content
                with open(os.path.join(root, "src", name), "wb") as f:
                    f.write(data)
            stdin = stdin.encode() if isinstance(stdin, str) else stdin
            return self._launch(root, main, stdin)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _launch(self, root: str, main: str, stdin: bytes) -> SandboxResult:
        uid, gid = self._pick_user()
        box = os.path.join(root, "box")
        spec = {"root": root, "uid": uid, "gid": gid, "uid_is_private": self.uid is None,
                "python": self.python, "main": main, "namespaces": self.namespaces,
                "limits": dataclasses.asdict(self.limits),
                "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": box, "TMPDIR": box,
                        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}}
        status_r, status_w = os.pipe()
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _LAUNCHER, json.dumps(spec), str(status_w)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(status_w,), start_new_session=True, env={})
        finally:
            os.close(status_w)
        try:
            deadline = start + self.limits.wall_seconds + _LAUNCHER_GRACE_S
            out, err, truncated, killed = _communicate(proc, stdin, deadline, self.limits.output_bytes)
            _wait_then_kill_group(proc, deadline)
            with os.fdopen(status_r, "rb") as f:
                status_r = None
                raw = f.read()
        finally:
            if status_r is not None:
                os.close(status_r)
            _wait_then_kill_group(proc, time.monotonic())
        report = json.loads(raw) if raw else {"returncode": None, "timed_out": True, "applied": [],
                                              "error": None}
        if report["error"]:
            raise SandboxError(f"sandbox set-up failed: {report['error'].strip()}")
        applied = tuple(report["applied"])
        self._warn_if_degraded(applied)
        timed_out = bool(report["timed_out"] or killed)
        return SandboxResult(returncode=None if timed_out else report["returncode"], stdout=out, stderr=err,
                             timed_out=timed_out, output_truncated=truncated, uid=uid, protections=applied,
                             wall_seconds=time.monotonic() - start)

    def _warn_if_degraded(self, applied: tuple[str, ...]) -> None:
        missing = [p for p in _FULL_PROTECTIONS if p not in applied]
        if not missing or not self.namespaces:
            return
        why = "not running as root" if not self.is_root else "the kernel refused them (no CAP_SYS_ADMIN?)"
        # A fixed text per case, so the default warning filter shows it once, not once per candidate.
        warnings.warn(f"meshrl sandbox: running candidates without {', '.join(missing)} ({why}); "
                      f"rlimits still apply, and the candidate's processes are killed at the end",
                      RuntimeWarning, stacklevel=3)


def _communicate(proc: subprocess.Popen, stdin: bytes, deadline: float, cap: int):
    """Feed stdin, read stdout/stderr up to `cap` bytes each, until EOF or `deadline`.

    Returns (stdout, stderr, truncated, killed). Past the cap the pipe is closed, so a flooding
    candidate dies of SIGPIPE rather than running on to its limits.
    """
    sel = selectors.DefaultSelector()
    out, err = bytearray(), bytearray()
    bufs = {proc.stdout: out, proc.stderr: err}
    for f in bufs:
        sel.register(f, selectors.EVENT_READ)
    view, offset = memoryview(stdin), 0
    if stdin:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    truncated = killed = False
    while sel.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _kill_group(proc)
            killed = True
            break
        for key, _ in sel.select(remaining):
            f = key.fileobj
            if f is proc.stdin:
                try:
                    offset += os.write(f.fileno(), view[offset:offset + 65536])
                except BrokenPipeError:
                    offset = len(view)  # a candidate that stops reading just loses the rest
                if offset >= len(view):
                    sel.unregister(f)
                    f.close()
                continue
            chunk, buf = os.read(f.fileno(), 65536), bufs[f]
            if chunk and len(buf) + len(chunk) <= cap:
                buf += chunk
                continue
            if chunk:
                buf += chunk[:cap - len(buf)]
                truncated = truncated or f is proc.stdout
            sel.unregister(f)
            f.close()
    sel.close()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if not f.closed:
            f.close()
    return bytes(out), bytes(err), truncated, killed


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_then_kill_group(proc: subprocess.Popen, deadline: float) -> None:
    """Wait for the launcher until `deadline`, then kill its process group and reap it.

    The group is killed before the launcher is reaped: until then its pid, and so the group id,
    cannot have been reused by an unrelated process.
    """
    if proc.returncode is not None:
        return
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # kernels before 5.3: reaping first leaves a (tiny) pid-reuse window
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    else:
        select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
        os.close(pidfd)
    _kill_group(proc)
    proc.wait()
