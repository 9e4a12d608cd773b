"""Sandbox launcher: isolates itself, then runs one candidate program under limits as another user.

Run by `sandbox.py` as `python -I -S _sandbox_child.py SPEC_JSON STATUS_FD`, by path rather than with
`-m`: importing the meshrl package could pull in heavy modules, and this process starts once per test.
It uses the standard library only.

Process tree, when namespaces are available (root with CAP_SYS_ADMIN):

    launcher (root, new session)          new net + mount namespace; enforces the wall-clock limit
      └ init   (root, pid 1 of a new pid namespace; mounts a private /proc, reaps orphans)
          └ candidate (unprivileged uid, rlimits, no_new_privs; execs the interpreter)

When init exits or is killed, the kernel kills every process in its pid namespace before init can be
reaped, so once the launcher has reaped init nothing of the candidate survives, whatever it did with
setsid() or double forks. Without a pid namespace the launcher is a child subreaper, inherits every
orphan of the tree and kills its descendants until none is left before reporting.

Reports one JSON object on STATUS_FD when done: returncode (128+N for signal N), timed_out, applied
(the protections in force) and error (set up failed: the candidate never ran).
"""

import ctypes
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
# statvfs f_flag bits equal the MS_* bits for these; a bind remount must restate them or loses them.
_KEEP_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048 | 4096  # + NOATIME, NODIRATIME, RELATIME
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
# Kernel filesystems the candidate needs as they are, or whose read-only remount means nothing.
_LEAVE_FSTYPES = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "devtmpfs", "securityfs", "debugfs",
                  "tracefs", "bpf", "fusectl", "configfs", "pstore", "binfmt_misc", "autofs"}
EXIT_SETUP_FAILED = 125


def _call(libc, name, *args):
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _mountinfo():
    """(mountpoint, fstype) of every mount in this namespace, parents before children."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mountpoint = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), left.split()[4])
            out.append((mountpoint, right.split()[0]))
    return out


def _readonly_everything(libc):
    """Remount every writable mount read-only in this (private) namespace; returns the failures."""
    _call(libc, "mount", None, b"/", None, MS_REC | MS_PRIVATE, None)
    failed = []
    for mountpoint, fstype in _mountinfo():
        if fstype in _LEAVE_FSTYPES or mountpoint.startswith(("/proc/", "/sys/")):
            continue
        try:
            flags = os.statvfs(mountpoint).f_flag
            if flags & MS_RDONLY:
                continue
            _call(libc, "mount", None, mountpoint.encode(), None,
                  MS_REMOUNT | MS_BIND | MS_RDONLY | (flags & _KEEP_FLAGS), None)
        except OSError:
            failed.append(mountpoint)
    return failed


def _isolate(libc, spec, applied):
    if not spec["namespaces"] or os.geteuid() != 0:
        return
    for name, flag in (("netns", CLONE_NEWNET), ("mountns", CLONE_NEWNS), ("pidns", CLONE_NEWPID)):
        if libc.unshare(flag) == 0:
            applied.append(name)
    if "mountns" in applied:
        failed = _readonly_everything(libc)
        applied.append("readonly" if not failed else "readonly-partial")


def _prepare_box(libc, spec, applied):
    """The candidate's working directory: a size-capped tmpfs when we have a mount namespace."""
    box, src = os.path.join(spec["root"], "box"), os.path.join(spec["root"], "src")
    uid, gid = spec["uid"], spec["gid"]
    if "mountns" in applied:
        opts = f"size={spec['limits']['disk_bytes']},nr_inodes=4096,mode=0700"
        if uid is not None:
            opts += f",uid={uid},gid={gid}"
        _call(libc, "mount", b"tmpfs", box.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode())
        applied.append("tmpfs")
    for name in os.listdir(src):
        shutil.copyfile(os.path.join(src, name), os.path.join(box, name))
        if uid is not None:
            os.chown(os.path.join(box, name), uid, gid)
    if uid is not None:
        os.chown(box, uid, gid)
    os.chmod(box, 0o700)
    return box


def _lower_limit(res, soft, hard):
    """Set a limit, never above the current hard limit (which only root could raise)."""
    cur_hard = resource.getrlimit(res)[1]
    if cur_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, cur_hard), min(hard, cur_hard)
    resource.setrlimit(res, (soft, hard))


def _set_limits(limits):
    cpu = max(1, math.ceil(limits["cpu_seconds"]))
    # RLIMIT_CPU's soft limit sends SIGXCPU; the hard limit one second later is SIGKILL, for programs
    # that catch or ignore SIGXCPU.
    _lower_limit(resource.RLIMIT_CPU, cpu, cpu + 1)
    for res, key in ((resource.RLIMIT_AS, "memory_bytes"), (resource.RLIMIT_FSIZE, "file_size_bytes"),
                     (resource.RLIMIT_NPROC, "processes"), (resource.RLIMIT_NOFILE, "open_files")):
        _lower_limit(res, int(limits[key]), int(limits[key]))
    _lower_limit(resource.RLIMIT_CORE, 0, 0)


def _exec_candidate(libc, spec, box, errpipe):
    """In the forked child: limits, privilege drop, exec. Never returns."""
    try:
        os.setpgid(0, 0)  # a group of its own, which the launcher can kill in one atomic call
        os.chdir(box)
        _set_limits(spec["limits"])
        if spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["gid"])
            os.setuid(spec["uid"])
        # Setuid binaries (su, mount, ...) must not give the candidate its privileges back.
        _call(libc, "prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        # After setuid: a credential change clears the parent-death signal.
        _call(libc, "prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; exec would inherit that
            signal.signal(sig, signal.SIG_DFL)
        python = spec["python"]
        os.execve(python, [python, "-I", "-B", spec["main"]], spec["env"])
    except BaseException as e:  # noqa: BLE001 - whatever failed, report it and never return
        try:
            os.write(errpipe, f"{type(e).__name__}: {e}".encode()[:2000])
        finally:
            os._exit(EXIT_SETUP_FAILED)


def _detach_stdio():
    """Drop our copies of the candidate's pipes, so the parent sees EOF when the candidate is gone."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _run_init(libc, spec, box, errpipe):
    """pid 1 of the new pid namespace: start the candidate, reap, exit with its status. Never returns."""
    try:
        _call(libc, "prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        try:  # a /proc of this namespace: the candidate cannot list the host's processes
            _call(libc, "mount", b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        except OSError:
            pass
        pid = os.fork()
        if pid == 0:
            _exec_candidate(libc, spec, box, errpipe)
        os.close(errpipe)
        _detach_stdio()
        while True:
            child, status = os.waitpid(-1, 0)
            if child == pid:
                os._exit(_exit_code(status))
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(errpipe, f"init: {type(e).__name__}: {e}".encode()[:2000])
        finally:
            os._exit(EXIT_SETUP_FAILED)


def _exit_code(status):
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _wait(pid, timeout):
    """Wait for `pid` up to `timeout` seconds, SIGKILL it past that; returns (wait status, timed_out)."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        ready = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]
        os.close(fd)
        if ready:
            return os.waitpid(pid, 0)[1], False
    else:
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status, False
            time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1], True


def _children(parent):
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            out.append(int(name))
    return out


def _sweep(uid, gid):
    """Kill every process of `uid`: kill(-1) from that uid reaches all of them, atomically w.r.t. fork."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        except BaseException:  # noqa: BLE001 - ESRCH (nothing left) included
            pass
        os._exit(0)
    os.waitpid(pid, 0)


def _kill_descendants(group, uid, gid, private_uid):
    """SIGKILL everything below us, for runs without a pid namespace.

    First the candidate's process group (one call, so a fork bomb cannot outrun it), then, with a
    private uid, every process of that uid (catches setsid() escapes the same way). Last, as a child
    subreaper we inherit every orphan of the tree, so killing and reaping our children reaches what
    is left: a process that dies hands its children to us before we reap it. A fork bomb whose
    processes each leave the group could outrun that loop, hence its bound.
    """
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if private_uid:
        _sweep(uid, gid)
    me = os.getpid()
    for _ in range(100):
        kids = _children(me)
        if not kids:
            return
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in kids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def main():
    spec, status_fd = json.loads(sys.argv[1]), int(sys.argv[2])
    os.set_inheritable(status_fd, False)
    report = {"returncode": None, "timed_out": False, "applied": [], "error": None}
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        _isolate(libc, spec, report["applied"])
        box = _prepare_box(libc, spec, report["applied"])
        if spec["uid"] is not None:
            report["applied"].append("uid")
        _call(libc, "prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        err_r, err_w = os.pipe()  # close-on-exec: EOF without data means the exec succeeded
        pid = os.fork()
        if pid == 0:
            os.close(err_r)
            if "pidns" in report["applied"]:
                _run_init(libc, spec, box, err_w)
            _exec_candidate(libc, spec, box, err_w)
        os.close(err_w)
        _detach_stdio()
        status, report["timed_out"] = _wait(pid, spec["limits"]["wall_seconds"])
        setup_error = b""
        while chunk := os.read(err_r, 4096):
            setup_error += chunk
        report["error"] = setup_error.decode(errors="replace") or None
        report["returncode"] = None if report["timed_out"] else _exit_code(status)
        if "pidns" not in report["applied"]:
            _kill_descendants(pid, spec["uid"], spec["gid"], spec["uid"] is not None and spec["uid_is_private"])
    except BaseException as e:  # noqa: BLE001 - the parent must hear about any set-up failure
        report["error"] = f"launcher: {type(e).__name__}: {e}"
    os.write(status_fd, json.dumps(report).encode())
    os._exit(0)


if __name__ == "__main__":
    main()
