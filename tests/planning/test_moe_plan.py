"""`meshrl plan` on mixture-of-experts models with expert parallelism: parameters per rank against
meta-built MoE stages, the MoE layer's saved activations against autograd's, reallocation across ep
against planning every layer, FLOPs from active parameters, memory per rank against ep, the
experts' all-to-all, the one-line errors of a bad ``ep``, and the two Qwen3-MoE examples."""
import os
import time

import pytest
import torch

from meshrl.engine.model.config import config_from_hf_dict
from meshrl.engine.model.llama import LlamaStage
from meshrl.engine.runtime.config import RunConfigError, load_run_config
from meshrl.parallel.layout import ParallelLayout
from meshrl.parallel.realloc_plan import plan, specs_for_layout
from meshrl.planning import costmodel as cm
from meshrl.planning.plan import PlanError, check_fit, format_report, plan_config
from meshrl.planning.rates import load_rates
from meshrl.planning.search import Search
from tests.planning.test_plan import saved_layer_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
MOE = dict(TINY, architectures=["Qwen3MoeForCausalLM"], num_experts=8, num_experts_per_tok=2,
           moe_intermediate_size=8)


def _moe(**kw):
    return config_from_hf_dict({**MOE, **kw})


def _grpo(actor=MOE, ref=None, *, overrides=(), nodes=1, gpus=4, batch=8, mem=80):
    base = dict(algorithm="grpo", data={"train": "unused.jsonl", "max_prompt_len": 8},
                models={"actor": {"scratch": actor}, "ref": {"scratch": ref or actor}},
                reward={"verifier": "arithmetic"}, generation={"max_new_tokens": 8, "batch_size": 4},
                grpo={"batch_size": batch, "group_size": 2, "minibatches": 2},
                cluster={"nodes": nodes, "gpus_per_node": gpus, "gpu_mem_gb": mem})
    return load_run_config(None, list(overrides), base=base)


def _calls(rep):
    return {p.name: p for p in rep.calls}


def _ep(call, ep):
    return [f"calls.{call}.model={'ref' if call == 'ref_inf' else 'actor'}", f"calls.{call}.ep={ep}"]


# ---- parameters, activations and reallocation against the model's own code ----------------------

MIXTRAL = dict(TINY, architectures=["MixtralForCausalLM"], num_local_experts=4, num_experts_per_tok=2)


@pytest.mark.parametrize("kw,tp,pp,dp,ep,head", [
    ({}, 1, 1, 4, 4, "lm"), ({}, 2, 2, 2, 2, "lm"), ({}, 1, 2, 4, 2, "value"),
    ({"mlp_only_layers": [1]}, 2, 2, 2, 1, "lm"),       # a dense layer among the sparse ones
    ({"decoder_sparse_step": 2}, 1, 2, 4, 2, "lm"),     # every other layer sparse
    (MIXTRAL, 2, 1, 2, 2, "lm")])                       # num_local_experts, experts of intermediate_size
def test_moe_stage_params_match_meta_built_stages(kw, tp, pp, dp, ep, head):
    """Every rank's parameter count, and its expert weights among them, as the model builds them."""
    cfg = config_from_hf_dict(kw) if kw is MIXTRAL else _moe(**kw)
    lay = ParallelLayout(ranks=list(range(tp * pp * dp)), tp=tp, pp=pp, dp=dp, ep=ep, virtual=True)
    s = cm.CallShape(cfg, head, tp=tp, pp=pp, dp=dp, ep=ep)
    for r in lay.ranks:
        stage = LlamaStage(cfg, lay.as_seen_by(r), head=head, device="meta")
        params = list(stage.parameters())
        experts = sum(p.numel() for p in params if getattr(p, "expert_parallel", False))
        pp_rank = lay.coord_of(r).pp
        assert cm.stage_params(s, pp_rank) == sum(p.numel() for p in params), (r, kw)
        assert cm.stage_expert_params(s, pp_rank) == experts > 0, (r, kw)


def test_moe_stage_params_sum_to_the_models_total():
    """One copy of the experts (the ep ranks of one tp rank at tp 1) and one copy of the dense
    weights add up to ModelConfig.num_params(); the active count keeps k of E experts."""
    cfg = _moe(num_hidden_layers=6, mlp_only_layers=[2])
    s = cm.CallShape(cfg, tp=1, pp=3, dp=4, ep=4)
    dense = sum(cm.stage_params(s, i) - cm.stage_expert_params(s, i) for i in range(3))
    assert dense + 4 * sum(cm.stage_expert_params(s, i) for i in range(3)) == cfg.num_params()
    expert = 3 * 16 * 8
    assert cfg.num_params() - cfg.num_params(active=True) == 5 * (8 - 2) * expert


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_activation_formula_matches_saved_tensors(dtype):
    """The bytes autograd keeps for one sparse decoder layer (as the dense layer's test measures):
    the formula per token, plus, below fp32, the router weight's fp32 copy (one per layer)."""
    cfg = _moe(hidden_size=64, intermediate_size=160, moe_intermediate_size=48)
    n = 37
    saved = saved_layer_bytes(LlamaStage(cfg, ParallelLayout(ranks=[0]), dtype=dtype), n, dtype)
    dt = torch.empty((), dtype=dtype).element_size()
    expected = n * cm.act_bytes_per_token_layer(cm.CallShape(cfg, dt=dt), sp=False, moe=True)
    router_copy = 64 * 8 * 4 if dt < 4 else 0
    # fp32: the layer's input is the previous layer's output; here it is x, so add its copy back
    assert saved + (n * 64 * 4 if dt == 4 else 0) == expected + router_copy


def _full_stats(mcfg, src, dst, gpn):
    build = lambda lay: LlamaStage(mcfg, lay, device="meta")  # noqa: E731
    return plan(src, dst, specs_for_layout(build, src), specs_for_layout(build, dst),
                node_of=lambda r: r // gpn, dtype=torch.float32).stats()


@pytest.mark.parametrize("kw,src,dst,gpn", [
    ({}, (1, 1, 4, 4), (2, 1, 2, 1), 2),                                       # ep4 -> tp2
    ({"num_hidden_layers": 6, "mlp_only_layers": [0, 3]}, (1, 2, 2, 2), (2, 3, 1, 1), 2),
    ({"num_hidden_layers": 8, "decoder_sparse_step": 2}, (2, 2, 2, 2), (1, 2, 4, 4), 4),
])
def test_moe_realloc_bytes_equal_the_planners_stats(kw, src, dst, gpn):
    """(tp, pp, dp, ep) → (tp, pp, dp, ep): one representative layer per (stages, dense or sparse)
    class moves exactly what planning every layer of the model moves."""
    mcfg = _moe(**kw)
    lay = [ParallelLayout(ranks=list(range(t * p * d)), tp=t, pp=p, dp=d, ep=e, virtual=True)
           for t, p, d, e in (src, dst)]
    full = _full_stats(mcfg, *lay, gpn)
    got = cm.realloc_cost(mcfg, "lm", torch.float32, *lay, gpus_per_node=gpn, intra_bw=1e9,
                          inter_bw=1e8, local_bw=1e10)
    for k in ("remote_bytes", "cross_node_bytes", "local_bytes", "sender_max_bytes"):
        assert got[k] == full[k], k
    assert got["remote_bytes"] > 0


# ---- FLOPs, memory, all-to-all --------------------------------------------------------------------

def test_moe_flops_and_compute_use_active_params():
    """Four times the experts (the same k) is ~3× the parameters but the same FLOPs per token: the
    FLOPs are 2·/6·active parameters per token, and the matmul time follows them (only the
    router grows); a dense model of the same active size prices the same matmul work."""
    small, big = _moe(), _moe(num_experts=32)
    assert big.num_params() > 2.5 * small.num_params()
    reps = [plan_config(_grpo({**MOE, "num_experts": E}), device="cpu", realloc=False)
            for E in (8, 32)]
    for rep, mcfg in zip(reps, (small, big)):
        wl = rep.workload
        c = _calls(rep)
        assert c["actor_train"].time.flops == 6 * mcfg.num_params(active=True) * wl.tokens
        assert c["ref_inf"].time.flops == 2 * mcfg.num_params(active=True) * wl.tokens
        assert c["actor_gen"].time.flops == 2 * mcfg.num_params(active=True) * wl.sequences * wl.seq_len
        assert c["actor_train"].time.flops < 6 * mcfg.num_params() * wl.tokens
    comp = [_calls(r)["actor_train"].time.parts["compute"] for r in reps]
    # the matmul time: one stage holds the whole model here, and its active count is the model's
    assert cm.stage_active_params(cm.CallShape(small), 0) == small.num_params(active=True)
    assert comp[1] / comp[0] < 1.2  # only the router grows (h·E per layer); the total is ~3×
    # a dense twin (intermediate k·f_e = 16: its MLP the size of the k experts') prices about the
    # same matmul work; the MoE's router and Qwen3's q/k norms apart
    twin = plan_config(_grpo({**TINY, "intermediate_size": 16}), device="cpu", realloc=False)
    assert _calls(twin)["actor_train"].time.parts["compute"] == pytest.approx(comp[0], rel=0.15)


def test_memory_per_rank_falls_with_ep():
    """ep shares out the experts: parameters and gradients per rank fall with ep, exactly by the
    experts a rank no longer holds; ZeRO-1's optimizer state was split over dp already (dense
    over dp, experts over dp/ep), so it stays; without ZeRO-1 it falls too."""
    mcfg = _moe()
    dense = mcfg.num_params() - 4 * 8 * 3 * 16 * 8
    rows = {}
    for ep in (1, 2, 4):
        rep = plan_config(_grpo(overrides=[*_ep("actor_train", ep), *_ep("actor_gen", ep),
                                           *_ep("ref_inf", ep)]), device="cpu", realloc=False)
        rows[ep] = _calls(rep)
        P = dense + 4 * 8 // ep * 3 * 16 * 8
        train = rows[ep]["actor_train"]
        assert train.tag == "tp1·pp1·dp4" + (f"·ep{ep}" if ep > 1 else "")
        assert (train.memory.params, train.memory.grads) == (4 * P, 4 * P)  # fp32: 4 bytes each
        assert train.memory.optim == pytest.approx(12 * mcfg.num_params() / 4)
    for a, b in ((1, 2), (2, 4)):
        for call in ("actor_train", "actor_gen", "ref_inf"):
            assert rows[b][call].memory.params < rows[a][call].memory.params
            assert rows[b][call].peak < rows[a][call].peak
    off = [_calls(plan_config(_grpo(overrides=["models.actor.optim.zero1=false", *_ep("actor_train", ep)]),
                              device="cpu", realloc=False))["actor_train"].memory.optim for ep in (1, 4)]
    assert off[1] < off[0]


def test_all_to_all_only_for_moe_with_ep_and_grows_with_tokens():
    """No all-to-all for a dense model or at ep 1; at ep > 1 each MoE layer moves 2·k·tokens·h·dt
    per pass, (ep−1)/ep of it off the rank, so twice the batch is twice the bytes; an ep group
    that crosses nodes takes longer than one inside a node."""
    plain = plan_config(_grpo(TINY), device="cpu", realloc=False)
    ep1 = plan_config(_grpo(), device="cpu", realloc=False)
    for rep in (plain, ep1):
        assert all(p.time.a2a_seconds == p.time.a2a_bytes == 0 and "ep_a2a" not in p.time.parts
                   for p in rep.calls)
        assert "expert all-to-all" not in format_report(rep)
    over = [o for c in ("actor_train", "actor_gen", "ref_inf") for o in _ep(c, 4)]
    reps = {b: plan_config(_grpo(overrides=over, batch=b), device="cpu", realloc=False) for b in (8, 16)}
    for b, rep in reps.items():
        c = _calls(rep)
        # fp32 ranks, 16 hidden, k 2, 4 sparse layers; per rank (dp4) a quarter of the tokens;
        # training: forward and backward; scoring: forward
        tokens = rep.workload.tokens / 4
        per_pass = 4 * 2 * 2 * tokens * 16 * 4 * 3 / 4
        assert c["ref_inf"].time.a2a_bytes == pytest.approx(per_pass)
        assert c["actor_train"].time.a2a_bytes == pytest.approx(2 * per_pass)
        assert all(p.time.a2a_seconds > 0 and p.time.parts["ep_a2a"] > 0 for p in rep.calls
                   if p.name != "actor_gen")
        assert c["actor_gen"].time.a2a_bytes > 0 and c["actor_gen"].time.parts["ep_a2a"] > 0
        assert "expert all-to-all" in format_report(rep)
    for name in ("actor_train", "actor_gen", "ref_inf"):
        small, big = (_calls(reps[b])[name].time for b in (8, 16))
        assert big.a2a_bytes == pytest.approx(2 * small.a2a_bytes)
        assert big.a2a_seconds > small.a2a_seconds
    # h100 rates price the cluster's links: 4 ranks on one node vs 2 nodes of 2, where a rank
    # sends a quarter of its buffer to each of 3 peers, 2 of them over its NIC
    reps = [plan_config(_grpo(overrides=over, nodes=n, gpus=4 // n, batch=4096), device="h100",
                        realloc=False) for n in (1, 2)]
    links = [cm.group_links(_calls(r)["actor_train"].layout, r.cfg.cluster, r.rates).ep for r in reps]
    assert [(x.size, x.intra_peers, x.inter_peers) for x in links] == [(4, 3, 0), (4, 1, 2)]
    nbytes = 1e6
    assert links[0].seconds(nbytes) == pytest.approx(reps[0].rates.latency_s + 3 * nbytes / 4 / (3600e9 / 8))
    assert links[1].seconds(nbytes) == pytest.approx(reps[1].rates.latency_s + 2 * nbytes / 4 / (400e9 / 8))
    one, two = (_calls(r)["actor_train"].time for r in reps)
    assert two.a2a_bytes == one.a2a_bytes and two.a2a_seconds > one.a2a_seconds


# ---- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,where,msg", [
    (["calls.actor_train.ep=3", "calls.actor_train.model=actor", "calls.actor_train.ranks=0-3"], "load",
     "calls.actor_train: ep=3 does not divide dp=4: expert ranks are carved from the call's "
     "data-parallel ranks; choose an ep that divides 4"),
    (["calls.actor_train.ep=3", "calls.actor_train.model=actor",  # dp from the cluster
      "models.actor.scratch.num_experts=6"], "plan",
     "calls.actor_train: ep=3 does not divide dp=4: expert ranks are carved from the call's "
     "data-parallel ranks; choose an ep that divides 4"),
    (["calls.actor_gen.ep=4", "calls.actor_gen.model=actor", "models.actor.scratch.num_experts=6"], "load",
     "calls.actor_gen: ep=4 does not divide model actor's num_experts=6: choose an ep that divides it"),
    (["calls.ref_inf.ep=2", "calls.ref_inf.model=ref", "models.ref.scratch.num_experts=0",
      "models.ref.scratch.architectures=[LlamaForCausalLM]"], "load",
     "calls.ref_inf: ep=2 but model ref is dense (num_experts=0): expert parallelism needs a "
     "mixture-of-experts model; set ep=1"),
    (["calls.actor_train.ep=0", "calls.actor_train.model=actor"], "load",
     "calls.actor_train.ep=0: must be at least 1"),
])
def test_bad_ep_is_one_line_naming_the_call_and_sizes(overrides, where, msg):
    if where == "load":
        with pytest.raises(RunConfigError) as e:
            _grpo(overrides=overrides)
    else:
        cfg = _grpo(overrides=overrides)
        with pytest.raises(RunConfigError) as e:
            plan_config(cfg, device="cpu")
    assert str(e.value) == msg and "\n" not in str(e.value)


def test_ep_of_a_model_given_by_path_is_checked_against_its_config(tmp_path):
    """A model directory's config.json is read for the check, and the planner checks the rest."""
    import json
    (tmp_path / "config.json").write_text(json.dumps({**MOE, "num_experts": 6}))
    with pytest.raises(RunConfigError, match=r"^calls\.actor_gen: ep=4 does not divide model actor's "
                       r"num_experts=6: choose an ep that divides it$"):
        _grpo(overrides=[f"models.actor.path={tmp_path}", "models.actor.scratch=null",
                         "models.ref.init_from=actor", "models.ref.scratch=null",
                         "calls.actor_gen.model=actor", "calls.actor_gen.ep=4"])
    cfg = _grpo(overrides=["calls.actor_gen.model=actor", "calls.actor_gen.ep=4",
                           "calls.actor_gen.dp=4"])
    cfg.models["actor"].scratch = {**MOE, "num_experts": 6}  # past load-time validation
    with pytest.raises(PlanError, match=r"^calls\.actor_gen: ep=4 does not divide model actor's "
                       r"num_experts=6"):
        plan_config(cfg, device="cpu")


# ---- search --------------------------------------------------------------------------------------

def test_search_tries_ep_for_moe_models_and_keeps_a_fixed_calls_ep():
    cfg = _grpo(overrides=[*_ep("ref_inf", 2)])
    s = Search(cfg, free=["actor_train", "actor_gen"], microbatch_tokens=(4096,), rates=load_rates("cpu"))
    eps = {ch.ep for ch in s._choices("actor_train")}
    assert eps == {1, 2, 4}
    assert [(ch.tp, ch.pp, ch.ep) for ch in s._choices("ref_inf")] == [(1, 1, 2)]
    res = s.run()
    assert res.complete and res.plans
    dense = Search(_grpo(TINY), free=["actor_train"], microbatch_tokens=(4096,), rates=load_rates("cpu"))
    assert {ch.ep for ch in dense._choices("actor_train")} == {1}


# ---- the examples --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,train_ep,gen_ep", [("grpo_qwen3_30b_a3b.yaml", 8, 8),
                                                  ("grpo_qwen3_235b_a22b.yaml", 8, 64)])
def test_moe_examples_validate_and_price(name, train_ep, gen_ep):
    t0 = time.perf_counter()
    cfg = load_run_config(os.path.join(ROOT, "examples", name))
    rep = plan_config(cfg, device="h100")
    check_fit(rep)
    text = format_report(rep)
    print(text)
    assert time.perf_counter() - t0 < 60
    c = _calls(rep)
    assert c["actor_train"].spec.ep == train_ep and c["actor_gen"].spec.ep == gen_ep
    assert all(p.peak <= 80e9 for p in rep.calls) and 0 < rep.step_seconds < float("inf")
    assert f"ep{train_ep}" in text and "expert all-to-all" in text
    for p in rep.calls:
        assert p.time.a2a_seconds > 0 and p.time.flops < 6 * p.mcfg.num_params() * rep.workload.tokens
    # training's ep group is one node: its all-to-alls stay on NVLink
    links = cm.group_links(c["actor_train"].layout, cfg.cluster, rep.rates)
    assert links.ep.size == train_ep and links.ep.inter_peers == 0
