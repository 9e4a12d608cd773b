"""A watchdog that turns a hang into a report and an exit, so that torchrun's restart can act.

Every rank runs a daemon thread. The main thread marks progress where a run moves on (entering and
leaving a model function call, a generation batch, a step, a checkpoint); every ``interval_s`` the
thread publishes this rank's state in the process group's store and reads every other rank's.

The job counts as stalled when *no* rank has marked progress for ``timeout_s``. Progress is global
on purpose: a rank outside a call's mesh waits in a gather for as long as that call runs, which is
not a hang while the ranks running the call move on. When stalled, each live rank prints one
report, ``meshrl watchdog: rank R ...``: no progress for how long, the call and step it is in,
every rank whose heartbeat stopped (SIGSTOP, a dead host, a process wedged in native code that holds
the GIL) with the call and step it was last seen in, and this rank's Python stacks (faulthandler);
then it exits with code 3. A rank whose heartbeat stopped and that lives on this host is killed
first (SIGKILL): a stopped process ignores torchrun's SIGTERM until continued, so it would hold the
job for the agent's whole stop timeout.

The thread's store calls time out after two intervals: if rank 0 (which hosts the store) is the
one that stopped, the others see no heartbeat at all and report that instead of blocking.
"""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time

EXIT_CODE = 3
_KEY = "meshrl/heartbeat/{}"


class Watchdog:
    def __init__(self, timeout_s: float, *, rank: int = 0, world: int = 1, store=None,
                 interval_s: float | None = None, exit_fn=os._exit, out=None):
        self.timeout_s = float(timeout_s)
        self.interval_s = interval_s or min(10.0, max(0.2, self.timeout_s / 10))
        self.rank, self.world = rank, world
        self.out = out or sys.stderr
        self._exit = exit_fn
        self._store = None
        if store is not None and world > 1:
            self._store = store.clone() if hasattr(store, "clone") else store
            with contextlib.suppress(Exception):  # a HashStore (tests) has no socket timeout
                self._store.set_timeout(datetime.timedelta(seconds=2 * self.interval_s))
        self._lock = threading.Lock()
        self._where: list[str] = ["startup"]
        self._step: int | None = None
        self._progress = 0
        self._beats = 0
        now = time.monotonic()
        # per rank: [last heartbeat count seen, when it changed, last progress count, when it
        # changed, last state published]; our own entry is kept from the main thread's marks
        self._seen: dict[int, list] = {r: [None, now, None, now, {}] for r in range(world)}
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="meshrl-watchdog", daemon=True)
        self.fired = False

    # ---- the main thread ---------------------------------------------------------------------
    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def mark(self, step: int | None = None):
        """Progress: the run moved on (optionally: to step ``step``)."""
        with self._lock:
            self._progress += 1
            if step is not None:
                self._step = step

    @contextlib.contextmanager
    def inside(self, name: str):
        """Mark progress on entering and leaving ``name`` (a call, a checkpoint, an evaluation);
        a report names the innermost one the rank is in. The thread publishes the change at once,
        so that a rank stopped right after entering a call is reported in it."""
        with self._lock:
            self._where.append(name)
            self._progress += 1
        self._changed.set()
        try:
            yield
        finally:
            with self._lock:
                self._where.pop()
                self._progress += 1
            self._changed.set()

    def close(self):
        self._stop.set()
        self._changed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5 * self.interval_s)

    # ---- the thread --------------------------------------------------------------------------
    def _state(self) -> dict:
        with self._lock:
            return {"beat": self._beats, "progress": self._progress, "where": self._where[-1],
                    "step": self._step, "pid": os.getpid(), "host": socket.gethostname()}

    def _loop(self):
        """Publish this rank's state every interval and whenever it enters or leaves a call (one
        store write); read the other ranks' (one multi-get) only while this rank itself has not
        moved on for an interval: a busy rank needs nobody's news, and the store sees O(ranks)
        reads per interval only from ranks that wait."""
        last_read = -float("inf")
        while True:  # the first beat at once: every rank is known (with its pid) from the start
            self._beats += 1
            mine = self._state()
            self._observe(self.rank, mine)
            now = time.monotonic()
            if self._store is not None:
                self._publish(mine)
                if now - self._seen[self.rank][3] > self.interval_s and now - last_read >= self.interval_s:
                    self._read_others()
                    last_read = now
            stalled = now - max(s[3] for s in self._seen.values())
            if stalled > self.timeout_s:
                self._fire(stalled)
                return
            self._changed.wait(self.interval_s)
            self._changed.clear()
            if self._stop.is_set():
                return

    def _publish(self, mine: dict):
        with contextlib.suppress(Exception):  # a store that does not answer: the report says why
            self._store.set(_KEY.format(self.rank), json.dumps(mine))

    def _read_others(self):
        """The other ranks' states; a store that does not answer (its host stopped) leaves their
        entries unchanged, so they age like stopped heartbeats."""
        keys = [_KEY.format(r) for r in range(self.world) if r != self.rank]
        try:
            if not self._store.check(keys):  # some rank has not published yet: only those that have
                keys = [k for k in keys if self._store.check([k])]
            for key, value in zip(keys, self._store.multi_get(keys) if keys else []):
                self._observe(int(key.rsplit("/", 1)[1]), json.loads(value))
        except Exception:  # noqa: BLE001 - a timeout here is what the report is for
            pass

    def _observe(self, rank: int, state: dict):
        s, now = self._seen[rank], time.monotonic()
        if state["beat"] != s[0]:
            s[0], s[1] = state["beat"], now
        if state["progress"] != s[2]:
            s[2], s[3] = state["progress"], now
        s[4] = state

    def silent(self) -> dict[int, float]:
        """Other ranks whose heartbeat has not changed for three intervals: seconds since it did."""
        now, limit = time.monotonic(), 3 * self.interval_s
        return {r: now - s[1] for r, s in self._seen.items() if r != self.rank and now - s[1] > limit}

    def report(self, stalled_s: float) -> str:
        mine = self._state()
        lines = [f"meshrl watchdog: rank {self.rank} of {self.world}: no rank made progress for "
                 f"{stalled_s:.0f} s (dist.timeout_s={self.timeout_s:g}); this rank is in "
                 f"{_where(mine)}"]
        for r, age in sorted(self.silent().items()):
            last = self._seen[r][4]
            seen = (f"last seen in {_where(last)} (pid {last['pid']} on {last['host']})" if last
                    else "never reported (did it start?)")
            lines.append(f"meshrl watchdog: rank {r} stopped reporting {age:.0f} s ago, {seen}: "
                         "stopped, dead, or stuck holding the GIL")
        others = [f"{r}: {_where(s[4])}" for r, s in sorted(self._seen.items())
                  if r != self.rank and r not in self.silent() and s[4]]
        if others:
            lines.append("meshrl watchdog: ranks still reporting, where they wait: " + "; ".join(others))
        lines.append(f"meshrl watchdog: rank {self.rank}'s Python stacks follow; exiting with code "
                     f"{EXIT_CODE} (torchrun --max-restarts restarts the job from its last checkpoint)")
        return "\n".join(lines)

    def _fire(self, stalled_s: float):
        self.fired = True
        print(self.report(stalled_s), file=self.out, flush=True)
        with contextlib.suppress(Exception):  # a stream without a file descriptor (tests)
            faulthandler.dump_traceback(file=self.out, all_threads=True)
        self._kill_stopped_here()
        with contextlib.suppress(Exception):
            self.out.flush()
        self._exit(EXIT_CODE)

    def _kill_stopped_here(self):
        host = socket.gethostname()
        for r in self.silent():
            last = self._seen[r][4]
            if last and last.get("host") == host and last.get("pid") not in (None, os.getpid()):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(last["pid"], signal.SIGKILL)


def _where(state: dict) -> str:
    step = state.get("step")
    return f"{state.get('where', '?')}" + (f" at step {step}" if step is not None else "")
