"""A two-node launch simulated on this machine: two torchrun agents (--nnodes 2, c10d rendezvous on
localhost, 2 ranks each) run PPO with the actor generating on one node's worth of ranks and training
across both, so its weights are reallocated across the node boundary; the planner prefers
intra-node senders and reports the bytes that cross."""
import json
import os
import subprocess
import sys

import pytest

from meshrl.engine.data.jsonl import write_jsonl
from meshrl.engine.runtime.metrics import read_metrics
from meshrl.engine.tasks import make_dataset
from meshrl.study.setup import init_scratch_model
from meshrl.testing.dist_pool import free_port

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


# (actor_train, actor_gen, what crosses the node boundary)
CASES = {
    # trains tp2 x dp2 over both nodes, generates tp2 on node 1: node 1 already holds a full
    # replica, so the planner takes everything from its own node although node 0 has it too
    "prefers_intra_node": ({"tp": 2}, {"ranks": "2-3", "tp": 2}, "none"),
    # trains on node 0 only, generates tp2 x dp2 on both: node 1's replica must cross
    "crosses": ({"ranks": "0-1", "tp": 2}, {"tp": 2}, "some"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_torchrun_agents_run_ppo_across_nodes(tmp_path, case):
    d = tmp_path
    train, gen, crossing = CASES[case]
    model = init_scratch_model(str(d / "init"), seed=12, overrides=TINY)
    write_jsonl(d / "prompts.jsonl", make_dataset(100, seed=13, digits=(1, 2)))
    cfg = d / "ppo.yaml"
    cfg.write_text(json.dumps({
        "algorithm": "ppo", "seed": 2, "run_dir": str(d / "run"), "save_hf": False,
        "models": {"actor": {"path": model, "optim": {"lr": 1e-3}},
                   "critic": {"path": model, "optim": {"lr": 1e-3}}, "ref": {"path": model}},
        "calls": {"actor_train": {"model": "actor", **train}, "actor_gen": {"model": "actor", **gen},
                  "ref_inf": {"model": "ref"}, "critic_inf": {"model": "critic"},
                  "critic_train": {"model": "critic"}},
        "data": {"train": str(d / "prompts.jsonl"), "max_len": 24, "max_prompt_len": 12},
        "reward": {"verifier": "tests.engine.runtime.toy_rewards:sevens"},
        "generation": {"max_new_tokens": 4, "top_k": 0},
        "ppo": {"iterations": 2, "batch_size": 16, "minibatches": 2},
        "logging": {"progress": False, "tensorboard": False}}))
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MESHRL_DEVICE="cpu", PYTHONPATH=os.getcwd())
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
         f"--node-rank={n}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
         "--rdzv-id=meshrl-two-nodes", "-m", "meshrl.cli", "run", str(cfg)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    outs = [a.communicate(timeout=300)[0] for a in agents]
    for a, out in zip(agents, outs):
        assert a.returncode == 0, out[-3000:]
    placement = json.load(open(d / "run" / "placement.json"))
    moved = placement["reallocation"]["actor_gen"]
    print(case, moved)
    if crossing == "none":
        assert moved["cross_node_bytes"] == 0 and moved["local_bytes"] > 0
    else:  # node 1's replica is a full copy of the weights, all of it from node 0
        assert moved["cross_node_bytes"] == moved["remote_bytes"] > 0
        assert moved["local_bytes"] > 0  # node 0's replica copies in place
    assert "across nodes" in outs[0]
    rows = [r for r in read_metrics(d / "run") if r["phase"] == "train"]
    assert len(rows) == 2 and rows[1]["time/realloc/actor_gen"] > 0
