"""Faults under torchrun, as a user meets them: a worker SIGKILLed mid-run is restarted by torchrun
(`--max-restarts`) and the run resumes from its newest complete checkpoint, on one agent or two;
a kill during a checkpoint's save resumes from the previous one; a SIGSTOPped rank ends the job
within `dist.timeout_s`, each live rank naming the stopped one and the call it was in. A restarted
run equals the uninterrupted one bit for bit: every metric row and every tensor of its final
checkpoint (models and optimizer states)."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from meshrl.engine.runtime.metrics import read_metrics
from meshrl.testing.dist_pool import free_port

from tests.engine.runtime.tiny import SEVENS, tiny_task
ITERATIONS = 6
# the issue's scenario in miniature: the actor trains at tp2·pp2 and generates at tp1·dp4, the
# critic trains at pp2·dp2 with ZeRO-1 sharding its optimizer state over the two replicas
CALLS = {"actor_train": {"model": "actor", "tp": 2, "pp": 2},
         "actor_gen": {"model": "actor", "tp": 1},
         "ref_inf": {"model": "ref"}, "critic_inf": {"model": "critic"},
         "critic_train": {"model": "critic", "pp": 2}}
# wall-clock fields (``time``, ``step_seconds``, ``time/<call>``); every other metric must match


def _volatile(key: str) -> bool:
    return key in ("time", "step_seconds") or key.startswith("time/")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_task(tmp_path_factory, "faults", model_seed=4, std=0.2, data_seed=6)


def _config(d, model, name, **extra) -> str:
    cfg = {"algorithm": "ppo", "seed": 3, "run_dir": str(d / name), "save_hf": False,
           "models": {"actor": {"path": model, "optim": {"lr": 1e-3}},
                      "critic": {"path": model, "optim": {"lr": 1e-3}}, "ref": {"path": model}},
           "calls": extra.pop("calls", CALLS),
           "data": {"train": str(d / "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
           "reward": {"verifier": SEVENS},
           "generation": {"max_new_tokens": 4, "top_k": 0},
           "ppo": {"iterations": ITERATIONS, "batch_size": 8, "minibatches": 2, "adaptive_kl": True,
                   "kl_target": 0.1, "kl_horizon": 100},
           "logging": {"progress": False, "tensorboard": False, "save_every": 2}, **extra}
    path = d / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    return str(path)


def _torchrun(args: list[str], tag: str, *, agent: str = "--standalone", nproc: int = 4,
              restarts: int = 1, script=("-m", "meshrl.cli"), env=None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MESHRL_DEVICE="cpu", PYTHONPATH=os.getcwd(),
               MESHRL_TEST_TAG=tag, **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", *agent.split(), f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", "--monitor-interval=0.2", *script, "run", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _worker_pid(tag: str, rank: int) -> int | None:
    """The pid of the worker of global rank ``rank`` among the processes launched with ``tag``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"MESHRL_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env and \
                b"TORCHELASTIC_RESTART_COUNT=0" in env:
            return int(pid)
    return None


def _wait_for(path, proc, limit_s=300):
    deadline = time.time() + limit_s
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the fault:\n" + proc.stdout.read()[-3000:]
    assert os.path.exists(path), f"{path} never appeared"


def _finish(proc, limit_s=400) -> str:
    out = proc.communicate(timeout=limit_s)[0]
    assert proc.returncode == 0, out[-4000:]
    return out


def _resumed_from(out: str) -> str:
    line = next(s for s in out.splitlines() if "resumed from" in s)
    return os.path.basename(line.split("resumed from")[1].strip())


def _rows(run_dir):
    return [{k: v for k, v in r.items() if not _volatile(k)} for r in read_metrics(run_dir)]


def _final_state(run_dir, tmp):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = os.path.join(tmp, f"{uuid.uuid4().hex}.pt")
    dcp_to_torch_save(os.path.join(run_dir, "checkpoints", f"step_{ITERATIONS}"), out)
    return torch.load(out, weights_only=False)


def _assert_same_run(d, ref_dir, run_dir):
    ref, got = _rows(ref_dir), _rows(run_dir)
    assert [r["step"] for r in got if r["phase"] == "train"] == list(range(ITERATIONS))
    assert got == ref  # every metric of every step, bit for bit
    a, b = _final_state(ref_dir, d), _final_state(run_dir, d)
    assert a.keys() == b.keys() and any(k.startswith("optim/") for k in a)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    d, model = workdir
    _finish(_torchrun([_config(d, model, "whole")], "whole", restarts=0))
    return str(d / "whole")


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_resumes(workdir, uninterrupted):
    d, model = workdir
    tag = uuid.uuid4().hex
    proc = _torchrun([_config(d, model, "killed")], tag)
    _wait_for(d / "killed" / "checkpoints" / "step_2", proc)
    os.kill(_worker_pid(tag, 2), signal.SIGKILL)
    assert _resumed_from(_finish(proc)) in ("step_2", "step_4")  # the newest when it was killed
    _assert_same_run(d, uninterrupted, str(d / "killed"))


def test_two_agents_restart_after_a_kill(workdir, uninterrupted):
    d, model = workdir
    tag, port = uuid.uuid4().hex, free_port()
    cfg = _config(d, model, "two_agents")
    agents = [_torchrun([cfg], tag, nproc=2, agent=f"--nnodes=2 --node-rank={n} --rdzv-backend=c10d "
                        f"--rdzv-endpoint=127.0.0.1:{port} --rdzv-id={tag}") for n in (0, 1)]
    _wait_for(d / "two_agents" / "checkpoints" / "step_2", agents[0])
    os.kill(_worker_pid(tag, 3), signal.SIGKILL)  # a worker of the second agent
    outs = [_finish(a) for a in agents]
    assert _resumed_from(outs[0]) in ("step_2", "step_4")
    _assert_same_run(d, uninterrupted, str(d / "two_agents"))


KILL_IN_SAVE = """
import os, sys
import meshrl.engine.checkpoint as ckpt
write_shards = ckpt.dcp.save

def save(state, checkpoint_id):
    # rank 1 dies once its shards of step 4 are on disk, before the checkpoint is complete
    write_shards(state, checkpoint_id=checkpoint_id)
    if (checkpoint_id.endswith("step_4.tmp") and os.environ["RANK"] == "1"
            and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"):
        os.kill(os.getpid(), 9)

ckpt.dcp.save = save
from meshrl.cli import main
sys.exit(main())
"""


def test_a_kill_during_save_resumes_from_the_previous_checkpoint(workdir, uninterrupted):
    d, model = workdir
    script = d / "kill_in_save.py"
    script.write_text(KILL_IN_SAVE)
    out = _finish(_torchrun([_config(d, model, "kill_in_save")], uuid.uuid4().hex,
                            script=(str(script),)))
    assert _resumed_from(out) == "step_2"  # step_4.tmp was left incomplete
    assert not os.path.exists(d / "kill_in_save" / "checkpoints" / "step_4.tmp")
    _assert_same_run(d, uninterrupted, str(d / "kill_in_save"))


def test_a_stopped_rank_ends_the_job_with_a_report(workdir):
    d, model = workdir
    tag, timeout_s = uuid.uuid4().hex, 8
    calls = {**CALLS, "actor_train": {"model": "actor", "tp": 2}}  # two ranks
    mark = d / "rank1_scoring"
    # rank 1 is stopped while its verifier scores (the third time): a known call, "actor_gen"
    cfg = _config(d, model, "stopped", calls=calls, dist={"timeout_s": timeout_s},
                  reward={"verifier": "tests.engine.runtime.toy_rewards:sevens_slow_on_rank_1"})
    proc = _torchrun([cfg], tag, nproc=2, restarts=0, env={"MESHRL_TEST_MARK": str(mark)})
    _wait_for(mark, proc)
    pid = _worker_pid(tag, 1)
    os.kill(pid, signal.SIGSTOP)
    stopped = time.time()
    try:
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    took = time.time() - stopped
    assert proc.returncode != 0
    # rank 0 reports itself and names the stopped rank with the call and step it was last in
    assert "meshrl watchdog: rank 0 of 2: no rank made progress for" in out, out[-3000:]
    line = next(s for s in out.splitlines() if "meshrl watchdog: rank 1 stopped reporting" in s)
    assert "last seen in actor_gen (rew_inf) at step 2" in line, line
    assert "Stack (most recent call first)" in out or "Current thread" in out  # faulthandler's dump
    # the report comes after timeout_s without progress; the job ends soon after (torchrun's
    # monitor and teardown), not after the collective's own much longer timeout
    assert took < timeout_s + 30, took
