"""A PPO run killed (SIGKILL) after a checkpoint resumes from it and reproduces the uninterrupted
run's metrics exactly for the same seed."""
import json
import os
import signal
import subprocess
import sys
import time

from meshrl.engine.data.jsonl import write_jsonl
from meshrl.engine.runtime.metrics import read_metrics
from meshrl.engine.tasks import make_dataset
from meshrl.study.setup import init_scratch_model

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
KEYS = ("score", "kl_seq", "actor/actor_loss", "critic/critic_loss", "kl_coef", "response_len")


def _config(d, model, run_dir):
    return {"algorithm": "ppo", "seed": 3, "run_dir": run_dir, "save_hf": False,
            "models": {"actor": {"path": model, "optim": {"lr": 1e-3}},
                       "critic": {"path": model, "optim": {"lr": 1e-3}}, "ref": {"path": model}},
            "data": {"train": str(d / "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
            "reward": {"verifier": "tests.engine.runtime.toy_rewards:sevens"},
            "generation": {"max_new_tokens": 4, "top_k": 0},
            "ppo": {"iterations": 8, "batch_size": 16, "minibatches": 2, "adaptive_kl": True,
                    "kl_target": 0.1, "kl_horizon": 100},
            "logging": {"progress": False, "tensorboard": False, "save_every": 3}}


def _launch(cfg_path):
    code = ("import json,sys; from meshrl.engine.runtime.config import load_run_config;"
            "from meshrl.engine.runtime.run import run_config;"
            "run_config(load_run_config(None, [], base=json.load(open(sys.argv[1]))))")
    env = dict(os.environ, OMP_NUM_THREADS="1", MESHRL_DEVICE="cpu")
    return subprocess.Popen([sys.executable, "-c", code, str(cfg_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _train_rows(run_dir):
    return [{k: r.get(k) for k in ("step", *KEYS)} for r in read_metrics(run_dir) if r["phase"] == "train"]


def test_killed_run_resumes_and_reproduces(tmp_path):
    d = tmp_path
    model = init_scratch_model(str(d / "init"), seed=4, overrides=TINY)
    write_jsonl(d / "prompts.jsonl", make_dataset(200, seed=6, digits=(1, 2)))
    full_cfg, kill_cfg = d / "full.json", d / "kill.json"
    full_cfg.write_text(json.dumps(_config(d, model, str(d / "full"))))
    kill_cfg.write_text(json.dumps(_config(d, model, str(d / "killed"))))
    p = _launch(full_cfg)
    assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]

    p = _launch(kill_cfg)
    latest = d / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(_train_rows(d / "killed")) < 8  # it really stopped short
    p = _launch(kill_cfg)
    assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]

    full, resumed = _train_rows(d / "full"), _train_rows(d / "killed")
    assert [r["step"] for r in resumed] == list(range(8))
    assert resumed == full  # bit-identical metrics, kl controller and value statistics included
