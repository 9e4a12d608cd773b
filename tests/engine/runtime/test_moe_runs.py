"""GRPO and PPO runs with a mixture-of-experts actor (a tiny Mixtral: 4 experts, top-2) at ep=2 on
two gloo ranks: the reward moves and the router losses and per-layer loads reach the metrics; and a
GRPO run whose actor trains at ep=2 and generates at tp=2 (a reallocation between them every step)."""
import pytest

from meshrl.engine.runtime.metrics import read_metrics
from tests.engine.runtime.test_algorithms import _base, _moved, _run
from tests.engine.runtime.tiny import tiny_task

MOE = dict(architectures=["MixtralForCausalLM"], hidden_size=64, intermediate_size=64,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
           num_experts_per_tok=2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_task(tmp_path_factory, "moe_runs", prompts=300, shape=MOE)


def _with_ep(base, ep):
    for call in base["calls"].values():
        call["ep"] = ep
    return base


@pytest.mark.parametrize("alg,gen_tp", [("grpo", 1), ("ppo", 1), ("grpo", 2)],
                         ids=["grpo-ep2", "ppo-ep2", "grpo-train-ep2-generate-tp2"])
def test_moe_actor_at_ep2_raises_reward_and_reports_router_loads(dist_pool, workdir, alg, gen_tp):
    d, model = workdir
    extra = (dict(grpo={"iterations": 12, "batch_size": 4, "group_size": 4, "minibatches": 2})
             if alg == "grpo" else
             dict(ppo={"iterations": 12, "batch_size": 16, "minibatches": 2, "kl_coef": 0.01}))
    base = _with_ep(_base(d, model, alg, (1, 1), **extra), 2)
    if gen_tp > 1:
        base["calls"]["actor_gen"].update(tp=gen_tp, ep=1)
    base["run_dir"] = str(d / f"{alg}-ep2-gen-tp{gen_tp}")
    dist_pool(2).run(_run, base)
    first, last = _moved(base["run_dir"], "score")
    assert last > first + 0.1, (first, last)
    rows = [r for r in read_metrics(base["run_dir"]) if r["phase"] == "train"]
    keys = set().union(*rows)
    router = sorted(k for k in keys if "router/" in k)
    assert any(k.endswith("router/aux_loss") for k in router), router
    for layer in (0, 1):
        assert any(k.endswith(f"router/layer{layer}/tokens_max") for k in router), router
        assert any(k.endswith(f"router/layer{layer}/tokens_mean") for k in router), router
    if gen_tp > 1:  # the generation view is refilled from the expert-parallel training layout
        import json
        with open(f"{base['run_dir']}/placement.json") as f:
            moves = json.load(f)["reallocation"]
        assert any(v.get("remote_bytes", 0) > 0 for v in moves.values()), moves
    aux = [r[k] for r in rows for k in router if k.endswith("router/aux_loss") and r.get(k)]
    assert aux and all(0 < a < 1e3 for a in aux), aux[:5]


def test_moe_run_at_ep2_resumes_exactly(dist_pool, workdir):
    """A checkpoint of an ep=2 run (expert weights and their optimizer state on the rank holding
    them) resumed gives the uninterrupted run's metrics, router statistics included, exactly."""
    import shutil
    d, model = workdir
    runs = {}
    for name in ("whole", "part"):
        base = _with_ep(_base(d, model, "grpo", (1, 1), grpo={"iterations": 5, "batch_size": 4,
                                                              "group_size": 4, "minibatches": 2},
                              logging={"save_every": 2}), 2)
        base["run_dir"] = str(d / f"resume-{name}")
        if name == "part":  # a run that stopped after its step-2 checkpoint: that alone, resumed
            part = d / "resume-part" / "checkpoints"
            part.mkdir(parents=True)
            shutil.copytree(d / "resume-whole" / "checkpoints" / "step_2", part / "step_2")
            (part / "latest").write_text("step_2")
        dist_pool(2).run(_run, base)
        runs[name] = {r["step"]: r for r in read_metrics(base["run_dir"]) if r["phase"] == "train"}
    assert sorted(runs["part"]) == [2, 3, 4], sorted(runs["part"])
    for step, row in runs["part"].items():
        keys = [k for k in row if k.startswith(("score", "actor/")) and "time" not in k]
        assert any("router/aux_loss" in k for k in keys), keys
        for k in keys:
            assert row[k] == runs["whole"][step][k], (step, k)


def test_a_checkpoint_in_another_ep_is_refused_naming_it():
    from meshrl.engine.checkpoint import CheckpointError, _check_layouts
    saved = {"ranks": [0, 1], "tp": 1, "pp": 1, "dp": 2, "ep": 2}
    now = {"ranks": [0, 1], "tp": 1, "pp": 1, "dp": 2}
    with pytest.raises(CheckpointError, match="layout tp=1 pp=1 dp=2 ep=2 on ranks 0-1; this run "
                                              "places it in tp=1 pp=1 dp=2 on ranks 0-1"):
        _check_layouts("ck", {"layouts": {"actor": saved}}, {"actor": now})


def test_moe_run_at_ep2_with_fewer_prompts_than_replicas(dist_pool, workdir):
    """One prompt per step on two ep=2 replicas: the replica given none still generates (a
    placeholder) and scores (empty microbatches) beside the other; the run completes and logs."""
    d, model = workdir
    base = _with_ep(_base(d, model, "grpo", (1, 1), grpo={"iterations": 2, "batch_size": 1,
                                                          "group_size": 4, "minibatches": 1}), 2)
    base["run_dir"] = str(d / "grpo-ep2-one-prompt")
    dist_pool(2).run(_run, base)
    rows = [r for r in read_metrics(base["run_dir"]) if r["phase"] == "train"]
    assert len(rows) == 2 and all("actor/router/aux_loss" in r for r in rows), rows
