"""meshrl's policy losses, loss aggregations, KL estimators and value loss against the peers' own
code: verl 0.9.1 (compute_policy_loss_vanilla, compute_policy_loss_gspo, agg_loss, kl_penalty,
compute_value_loss), OpenRLHF 0.11.2 (PolicyLoss, ValueLoss, compute_approx_kl) and TRL 1.16.0
(GRPOTrainer._compute_loss's loss types), values and gradients.

The batch is meshrl's: packed prompt + response tokens, ``cu_seqlens`` over whole sequences, a
mask that drops the prompt, some response tokens and one whole response; prompt positions hold
garbage log-probs (±40) that must not leak. The peers get the responses padded [B, T] with the
mask, and gradients are compared on the same leaf tensor. Each loss is checked on the whole batch
and on two microbatches with the whole batch's counts (meshrl's ``LossCounts``; verl's
batch_num_tokens / global_batch_size / loss_scale_factor; OpenRLHF's the same names).

Conventions that differ, adapted here by name:
- VERL_CLIP_C: verl's vanilla loss always applies the dual clip (clip_ratio_c defaults to 3);
  meshrl's ``clip`` is verl's with clip_ratio_c = 1e9 (never binding), ``dual_clip`` with 3.
- LOG_RATIO_CLAMP: verl clamps log-ratios at ±20 (PPO) and GSPO's at 10 (as meshrl); OpenRLHF's
  GSPO does not clamp. Log-ratios here stay below 3 in magnitude, far from every clamp.
- KL_CLAMP: verl's low_var_kl and every OpenRLHF estimator clamp the estimate to ±10; meshrl's do
  not. Past the clamp, meshrl's value is clamped by the test.
- EPS_1E8: verl's masked_mean and seq-mean-token-mean divide by (count + 1e-8), OpenRLHF's
  sequence mean too: relative 1e-8/count, hence 2e-8 where that path is taken.
- GSPO_FORM: OpenRLHF's and TRL's GSPO use the sequence ratio exp(mean log ρ) itself, verl's and
  meshrl's the GSPO-token form s·π_t/sg(π_t); same value, and the same gradient when the
  advantage is constant over a response under seq-mean-token-mean (the GSPO paper's setting).
- TRL_SEQS: TRL's grpo and dr_grpo divide by the batch's B (a response with no counted action
  counts); verl's and meshrl's by the responses with one (``LossCounts.seqs``): B is passed here.
Float64 inputs throughout; tolerance 1e-12 where both sides do the same float64 arithmetic in
another order (where a peer computes in fp32, the tolerance there says so).
"""
import pytest
import torch

from meshrl.engine.algorithms.policy_losses import LossCounts, aggregate, policy_terms
from meshrl.engine.algorithms.ppo_losses import kl_estimate, ppo_value_loss
from meshrl.engine.algorithms.reductions import zero_masked
from tests.engine.algorithms import peers
from tests.engine.algorithms.peers import ragged

f64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)
# EPS_1E8 (with the integer masks used here the 1e-8 is lost in fp32 and the measured difference is
# 1e-16; a float mask would show it)
TOL_EPS = dict(rtol=2e-8, atol=1e-12)
# The peers' fraction metrics are fp32 whatever the input (``.float()`` on the boolean): one
# rounding, ≤ 6e-8 relative, far below 1/count (~1e-2) between two different counts.
FRAC = dict(rel=2e-7, abs=1e-12)
MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
NORM_LEN = 16.0  # seq-mean-token-sum-norm's constant (Dr.GRPO: the generation limit)
SPLITS = [None, slice(0, 7), slice(7, None)]  # the whole batch, then two microbatches


def _batch(seed, *, per_seq_adv=False):
    g, _, rlens = ragged(seed)
    B = len(rlens)
    plens = torch.randint(1, 6, (B,), generator=g)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(plens + rlens, 0)
    n = int(cu[-1])
    resp = torch.zeros(n, dtype=torch.bool)
    for i in range(B):
        resp[int(cu[i]) + int(plens[i]):int(cu[i + 1])] = True
    mask = resp & (torch.rand(n, generator=g) > 0.15)
    mask[int(cu[2]):int(cu[3])] = False  # a response with no counted action
    old = -3 * torch.rand(n, generator=g, dtype=f64)
    logp = old + 0.3 * torch.randn(n, generator=g, dtype=f64)
    far = torch.rand(n, generator=g) < 0.1  # ratios far outside the clip range, both ways
    logp[far] += 1.5 * torch.sign(torch.randn(int(far.sum()), generator=g, dtype=f64))
    old[~resp], logp[~resp] = 40.0, -40.0  # prompt positions: not log-probs of actions
    adv = torch.randn(n, generator=g, dtype=f64)
    if per_seq_adv:
        adv = torch.repeat_interleave(torch.randn(B, generator=g, dtype=f64), (plens + rlens).long())
    ref = logp + 0.3 * torch.randn(n, generator=g, dtype=f64)
    return dict(cu=cu, plens=plens, resp=resp, mask=mask, old=old, logp=logp.requires_grad_(),
                adv=adv, ref=ref)


def _select(b, part):
    """The sequences ``part`` (a slice; None: all) of batch ``b``: (their indices, their packed
    token indices, their cu_seqlens)."""
    cu = b["cu"]
    seqs = range(cu.numel() - 1)[part] if part is not None else range(cu.numel() - 1)
    tok = torch.cat([torch.arange(int(cu[i]), int(cu[i + 1])) for i in seqs])
    sub_cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    sub_cu[1:] = torch.cumsum(torch.tensor([int(cu[i + 1] - cu[i]) for i in seqs]), 0)
    return seqs, tok, sub_cu


def _padded(b, seqs, x, fill=0.0):
    """Responses of ``seqs`` as [len(seqs), T] (differentiable in ``x``)."""
    rows = [torch.arange(int(b["cu"][i]) + int(b["plens"][i]), int(b["cu"][i + 1])) for i in seqs]
    T = max(r.numel() for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for j, r in enumerate(rows):
        idx[j, :r.numel()], valid[j, :r.numel()] = r, True
    return torch.where(valid, x[idx], torch.as_tensor(fill, dtype=x.dtype))


def _counts(b):
    m = b["mask"]
    seqs = sum(bool(m[int(s):int(e)].any()) for s, e in zip(b["cu"][:-1], b["cu"][1:]))
    return LossCounts(tokens=float(m.sum()), seqs=float(seqs), norm_len=NORM_LEN)


def _meshrl(b, part, kind, mode, counts, **kw):
    seqs, tok, cu = _select(b, part)
    per_token, m = policy_terms(b["logp"][tok], b["old"][tok], b["adv"][tok], b["mask"][tok], cu,
                                kind=kind, **kw)
    loss = aggregate(per_token, b["mask"][tok], cu, mode, counts)
    return loss, _grad(loss, b), m


def _grad(loss, b):
    return torch.autograd.grad(loss, b["logp"])[0]


# --- verl --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["clip", "dual_clip", "gspo"])
@pytest.mark.parametrize("mode", MODES)
def test_policy_losses_match_verl(kind, mode):
    ca = peers.verl().core_algos
    b = _batch(10)
    counts = _counts(b)
    low, high, c = 0.2, 0.28, 3.0  # DAPO's clip-higher
    for part in SPLITS:
        seqs, _, _ = _select(b, part)
        cfg = peers.verl_actor_config(clip_ratio=0.2, clip_ratio_low=low, clip_ratio_high=high,
                                      clip_ratio_c=c if kind == "dual_clip" else 1e9,  # VERL_CLIP_C
                                      batch_num_tokens=counts.tokens, global_batch_size=counts.seqs,
                                      loss_scale_factor=counts.norm_len)
        fn = ca.compute_policy_loss_gspo if kind == "gspo" else ca.compute_policy_loss_vanilla
        mask = _padded(b, seqs, b["mask"].long(), 0)
        ref_loss, ref_m = fn(_padded(b, seqs, b["old"]), _padded(b, seqs, b["logp"]),
                             _padded(b, seqs, b["adv"]), mask, loss_agg_mode=mode, config=cfg)
        loss, grad, m = _meshrl(b, part, kind, mode, counts, clip_eps_low=low, clip_eps_high=high,
                                clip_ratio_c=c)
        tol = TOL_EPS if mode == "seq-mean-token-mean" else TOL
        torch.testing.assert_close(loss, ref_loss, **tol)
        torch.testing.assert_close(grad, _grad(ref_loss, b), **tol)
        assert m["clip_frac"].item() == pytest.approx(ref_m["actor/pg_clipfrac"], **FRAC)
        if kind == "dual_clip":
            assert m["clip_frac_lower"].item() == pytest.approx(ref_m["actor/pg_clipfrac_lower"], **FRAC)
        if part is None:  # every branch is taken somewhere in the batch
            assert 0 < m["clip_frac"].item() < 1
            assert kind != "dual_clip" or m["clip_frac_lower"].item() > 0


@pytest.mark.parametrize("estimator, verl_names", [("k1", ["kl", "k1"]), ("k2", ["mse", "k2"]),
                                                   ("k3", ["low_var_kl", "k3"])])
@pytest.mark.parametrize("spread", [1.0, 15.0])
def test_kl_estimators_match_verl_and_openrlhf(estimator, verl_names, spread):
    """spread 1: no peer clamp binds; spread 15: KL_CLAMP (verl's k1 and k2 do not clamp; its k3
    also clamps the log-ratio at ±20 before exp, never reached here). OpenRLHF computes in fp32
    (``log_probs.float()``): 1e-6 relative and absolute for values up to 10, k3's exp(d) − 1 − d
    cancelling a few fp32 ulps (measured: 1.8e-6 absolute on a value near 10)."""
    g = torch.Generator().manual_seed(11)
    ref = -3 * torch.rand(400, generator=g, dtype=f64)
    logp = (ref + spread * (2 * torch.rand(400, generator=g, dtype=f64) - 1)).requires_grad_()
    mine = kl_estimate(logp, ref, estimator)
    grad = torch.autograd.grad(mine.sum(), logp, retain_graph=True)[0]
    clamped = mine.clamp(-10, 10)
    fp32 = dict(rtol=1e-6, atol=1e-6)
    oracles = [(peers.verl().core_algos.kl_penalty(logp, ref, name),
                clamped if estimator == "k3" else mine, TOL) for name in verl_names]
    oracles.append((peers.openrlhf().utils.compute_approx_kl(logp, ref, kl_estimator=estimator),
                    clamped, fp32))
    for ref_kl, expected, tol in oracles:
        torch.testing.assert_close(expected, ref_kl.double(), **tol)
        if spread < 10:  # no clamp: the gradients agree too
            torch.testing.assert_close(grad, torch.autograd.grad(ref_kl.sum(), logp)[0].double(), **tol)
    assert (mine.abs() > 10).any() == (spread > 10)  # the clamp was exercised, or not at all


def _value_batch():
    g, cu, _ = ragged(12)
    n = int(cu[-1])
    old = torch.randn(n, generator=g, dtype=f64)
    values = (old + 0.3 * torch.randn(n, generator=g, dtype=f64)).requires_grad_()
    returns = old + torch.randn(n, generator=g, dtype=f64)
    mask = torch.rand(n, generator=g) > 0.15
    return cu, values, old, returns, mask


@pytest.mark.parametrize("value_clip", [0.2, None])
def test_value_loss_matches_verl_and_openrlhf(value_clip):
    cu, values, old, returns, mask = _value_batch()
    pad = lambda x: peers.spread(x, cu, torch.Generator())[0]  # noqa: E731  (no holes: no randomness)
    pmask = pad(mask.long())
    tokens = float(mask.sum())
    loss, m = ppo_value_loss(values, old, returns, mask, value_clip=value_clip, num_tokens=tokens)
    grad = torch.autograd.grad(loss, values)[0]
    oracles = [peers.openrlhf().loss.ValueLoss(clip_eps=value_clip)(
        pad(values), pad(old), pad(returns), pmask, batch_num_tokens=tokens)]
    if value_clip is not None:  # verl's takes a clip range always
        ref_loss, clipfrac = peers.verl().core_algos.compute_value_loss(
            pad(values), pad(returns), pad(old), pmask, value_clip, "token-mean", batch_num_tokens=tokens)
        oracles.append(ref_loss)
        assert m["vf_clip_frac"].item() == pytest.approx(clipfrac.item(), rel=2e-8)  # EPS_1E8
        assert 0 < clipfrac.item() < 1
    for ref_loss in oracles:
        torch.testing.assert_close(loss, ref_loss, **TOL)
        torch.testing.assert_close(grad, torch.autograd.grad(ref_loss, values)[0], **TOL)


# --- OpenRLHF ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, token_level", [("clip", True), ("clip", False), ("dual_clip", True),
                                               ("dual_clip", False), ("gspo", False)])
def test_policy_losses_match_openrlhf(kind, token_level):
    orl = peers.openrlhf()
    b = _batch(13, per_seq_adv=kind == "gspo")  # GSPO_FORM
    counts = _counts(b)
    mode = "token-mean" if token_level else "seq-mean-token-mean"
    loss_fn = orl.loss.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28,
                                  dual_clip=3.0 if kind == "dual_clip" else None,
                                  token_level_loss=token_level,
                                  policy_loss_type="gspo" if kind == "gspo" else "ppo")
    for part in SPLITS:
        seqs, _, _ = _select(b, part)
        mask = _padded(b, seqs, b["mask"].long(), 0)
        ref_loss, clip_ratio, _, _, _ = loss_fn(_padded(b, seqs, b["logp"]), _padded(b, seqs, b["old"]),
                                                _padded(b, seqs, b["adv"]), mask,
                                                batch_num_tokens=counts.tokens,
                                                global_batch_size=counts.seqs)
        loss, grad, m = _meshrl(b, part, kind, mode, counts, clip_eps_low=0.2, clip_eps_high=0.28,
                                clip_ratio_c=3.0)
        tol = TOL if token_level else TOL_EPS
        torch.testing.assert_close(loss, ref_loss, **tol)
        torch.testing.assert_close(grad, _grad(ref_loss, b), **tol)
        assert m["clip_frac"].item() == pytest.approx(clip_ratio.item(), **FRAC)
        # meshrl's approx_kl is k3 of KL(π_old‖π): OpenRLHF's compute_approx_kl(old, new, "k3"),
        # which computes in fp32 (mean of O(0.1) values: a few fp32 roundings)
        k3 = orl.utils.compute_approx_kl(_padded(b, seqs, b["old"]), _padded(b, seqs, b["logp"]).detach(),
                                         kl_estimator="k3")
        assert m["approx_kl"].item() == pytest.approx(orl.utils.masked_mean(k3, mask).item(), rel=1e-6)


# --- TRL ---------------------------------------------------------------------------------------

TRL_CASES = {  # loss_type -> meshrl's aggregation and its counts (TRL_SEQS)
    "grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean"}


@pytest.mark.parametrize("loss_type, level, beta", [("grpo", "token", 0.0), ("grpo", "token", 0.04),
                                                    ("bnpo", "token", 0.0), ("dr_grpo", "token", 0.0),
                                                    ("dapo", "token", 0.04), ("grpo", "sequence", 0.0)])
def test_grpo_loss_types_match_trl(loss_type, level, beta):
    """TRL on one process without gradient accumulation: its normalisers are this batch's. Its
    KL (beta) is k3 in the loss; the "sequence" level with "grpo" is GSPO (GSPO_FORM)."""
    b = _batch(14, per_seq_adv=level == "sequence")
    B = b["cu"].numel() - 1
    seqs = range(B)
    mask = _padded(b, seqs, b["mask"].long(), 0)
    adv = _padded(b, seqs, b["adv"])
    if level == "sequence":
        adv = adv[:, 0]  # TRL's GRPO advantages are per sequence, [B]
    ref_loss, metrics = peers.trl_grpo_loss(
        _padded(b, seqs, b["logp"]), _padded(b, seqs, b["old"]), adv, mask, loss_type=loss_type,
        epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level=level, beta=beta,
        ref_logp=_padded(b, seqs, b["ref"]), max_completion_length=int(NORM_LEN),
        num_items_in_batch=float(b["mask"].sum()))
    counts = LossCounts(tokens=float(b["mask"].sum()), seqs=float(B), norm_len=NORM_LEN)  # TRL_SEQS
    _, tok, cu = _select(b, None)
    per_token, m = policy_terms(b["logp"], b["old"], b["adv"], b["mask"], cu,
                                kind="gspo" if level == "sequence" else "clip",
                                clip_eps_low=0.2, clip_eps_high=0.28)
    if beta:  # the GRPO composition (as the actor's call does): k3 KL to the reference, through logp
        per_token = per_token + beta * kl_estimate(zero_masked(b["logp"], b["mask"]),
                                                   zero_masked(b["ref"], b["mask"]), "k3")
    loss = aggregate(per_token, b["mask"], cu, TRL_CASES[loss_type], counts)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(_grad(loss, b), _grad(ref_loss, b), **TOL)
    # TRL's clip_ratio/region_mean: ρ below 1 − ε_low with A < 0, or above 1 + ε_high with A > 0
    if level == "token":
        assert m["clip_frac"].item() == pytest.approx(metrics["clip_ratio/region_mean"][0], **FRAC)
