"""The watchdog: a job where no rank moves on for timeout_s is reported (the stopped rank, where
each rank was) and ended; a rank that only waits while another moves on is left alone. Two
watchdogs share one in-memory store here, as two ranks share the process group's store."""
import io
import time

import torch.distributed as dist

from meshrl.engine.watchdog import EXIT_CODE, Watchdog


class Exited(list):
    def __call__(self, code):
        self.append(code)


def _pair(timeout_s=0.6, interval_s=0.05):
    store, exits = dist.HashStore(), [Exited(), Exited()]
    outs = [io.StringIO(), io.StringIO()]
    dogs = [Watchdog(timeout_s, rank=r, world=2, store=store, interval_s=interval_s,
                     exit_fn=exits[r], out=outs[r]) for r in range(2)]
    return dogs, exits, outs


def _wait(cond, limit_s=10.0):
    deadline = time.monotonic() + limit_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_a_stopped_rank_is_named_with_its_call_and_the_job_ends():
    dogs, exits, outs = _pair()
    for d in dogs:
        d.start()
    dogs[0].mark(step=3)
    dogs[1].mark(step=3)
    with dogs[0].inside("critic_train"), dogs[1].inside("actor_gen"):
        t0 = time.monotonic()  # the last progress any rank makes
        time.sleep(0.2)  # both report for a while: rank 1's last state is known
        dogs[1]._stop.set()  # rank 1 stops (as SIGSTOP would): no heartbeat, no progress
        assert _wait(lambda: exits[0] == [EXIT_CODE])
        waited = time.monotonic() - t0
    dogs[0].close()
    report = outs[0].getvalue()
    assert "rank 0 of 2: no rank made progress for" in report
    assert "this rank is in critic_train at step 3" in report
    assert "rank 1 stopped reporting" in report and "last seen in actor_gen at step 3" in report
    assert 0.6 <= waited < 3.0, waited  # fires once the timeout after the last progress passes, not long after


def test_waiting_while_another_rank_moves_on_is_not_a_hang():
    dogs, exits, outs = _pair()
    for d in dogs:
        d.start()
    deadline = time.monotonic() + 1.5  # 2.5 timeouts: rank 0 idles, rank 1 keeps moving on
    with dogs[0].inside("gather"):
        while time.monotonic() < deadline:
            dogs[1].mark()
            time.sleep(0.05)
    assert exits == [[], []] and not any(o.getvalue() for o in outs)
    # then nobody moves on: both fire, and neither names the other as stopped (both still beat)
    assert _wait(lambda: exits[0] and exits[1])
    for d in dogs:
        d.close()
    assert "stopped reporting" not in outs[0].getvalue() + outs[1].getvalue()
    assert "ranks still reporting, where they wait: 1: startup" in outs[0].getvalue()


def test_a_single_process_reports_its_own_stall():
    exited, out = Exited(), io.StringIO()
    dog = Watchdog(0.3, interval_s=0.05, exit_fn=exited, out=out).start()
    with dog.inside("actor_train"):
        assert _wait(lambda: exited == [EXIT_CODE])
    dog.close()
    assert "rank 0 of 1" in out.getvalue() and "this rank is in actor_train" in out.getvalue()


def _heartbeats_through_the_process_groups_store():
    from meshrl.engine.distributed import default_store
    rank = dist.get_rank()
    dog = Watchdog(60, rank=rank, world=2, store=default_store(), interval_s=0.05).start()
    with dog.inside(f"call_{rank}"):
        dog.mark(step=rank + 4)
        ok = _wait(lambda: dog._seen[1 - rank][4].get("where") == f"call_{1 - rank}")
        dist.barrier()
    dog.close()
    return ok, dog._seen[1 - rank][4].get("step")


def test_heartbeats_travel_through_the_process_groups_store(dist_pool):
    assert dist_pool(2).run(_heartbeats_through_the_process_groups_store) == [(True, 5), (True, 4)]
