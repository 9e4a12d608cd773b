"""meshrl's advantage estimators, returns and GAE against the peers' own code (verl 0.9.1's
core_algos, OpenRLHF 0.11.2's experience maker, TRL 1.16.0's group scaling), on random ragged
batches converted from meshrl's packed actions to the peers' padded [B, T] + mask and back.

Conventions that differ, adapted here by name:
- BESSEL: verl's masked_whiten divides by the unbiased (n − 1) variance, meshrl's (like OpenRLHF's)
  by the biased one; verl's output is rescaled by √((var_u + 1e-8)/(var_b + 1e-8)), both
  variances from verl's own ``masked_var``.
- RPP_BASELINE: verl's REINFORCE++-baseline sums the token rewards, subtracts the group mean and
  broadcasts (no per-token return); meshrl's follows OpenRLHF (adjusted score at the last action
  plus per-token KL rewards, returns-to-go). They coincide without per-token KL, so verl is checked
  there and OpenRLHF with KL.
- GRPO_EPS: meshrl's and verl's GRPO add 1e-6 to the group std, OpenRLHF's 1e-9, TRL's 1e-4:
  meshrl is called with the peer's ε (``baseline_adjusted``'s ``eps``).
- BOOTSTRAP: verl's GAE has no bootstrap value; δ at the last action is r + γ·V_boot − V, which
  is verl's δ with the reward r + γ·V_boot there.

Tolerances: meshrl's per-response values stay float64 for float64 scores (compared at 1e-12:
the same few float64 operations in another order). Token advantages, returns and GAE are fp32 by
contract (the gae kernel), against float64 oracles: FP32_TOL below.
"""
import numpy as np
import pytest
import torch

from meshrl.engine.algorithms.advantages import baseline_adjusted, token_advantages
from meshrl.engine.algorithms.ppo_losses import kl_estimate
from meshrl.kernels import gae, masked_whiten
from tests.engine.algorithms import peers
from tests.engine.algorithms.peers import OpenRLHFExperience, ragged, spread, unpad

f64 = torch.float64
K = 4  # samples per prompt
# fp32 returns: up to 12 accumulated O(1) terms, each rounding ≤ 6e-8 relative, so ≤ ~4e-6 in the
# worst case; whitening divides by a std of O(1). (OpenRLHF's KL is fp32 too: compute_approx_kl
# casts.) Measured max error here: ~5e-7.
FP32_TOL = dict(rtol=0, atol=4e-6)
F64_TOL = dict(rtol=1e-12, atol=1e-12)


def _scores(g, B):
    s = torch.randn(B, generator=g, dtype=f64)
    s[K:2 * K] = 0.5                                  # a group that all scores the same: std 0
    s[2 * K:3 * K] = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=f64)  # binary verifier rewards
    return s


def _outcome_rewards(scores, cu, g):
    """verl's token_level_rewards: the score at each response's last action, zeros elsewhere."""
    packed = torch.zeros(int(cu[-1]), dtype=f64)
    packed[cu[1:].long() - 1] = scores
    return spread(packed, cu, g)


def _bessel(verl_whitened, x, mask):
    """BESSEL: verl's whitened x as meshrl (biased variance) would give it."""
    F = peers.verl().F
    var_u = F.masked_var(x, mask, unbiased=True)
    var_b = F.masked_var(x, mask, unbiased=False)
    return verl_whitened * torch.sqrt((var_u + 1e-8) / (var_b + 1e-8))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_match_verl(estimator):
    ca = peers.verl().core_algos
    g, cu, _ = ragged(0)
    scores = _scores(g, cu.numel() - 1)
    rewards, mask = _outcome_rewards(scores, cu, g)
    index = np.repeat(np.arange(len(scores) // K), K)
    if estimator == "rloo":
        fns = [ca.compute_rloo_outcome_advantage, ca.compute_rloo_vectorized_outcome_advantage]
        kw = {}
    else:
        fns = [ca.compute_grpo_outcome_advantage, ca.compute_grpo_vectorized_outcome_advantage]
        kw = dict(norm_adv_by_std_in_grpo=estimator == "grpo")  # False is verl's Dr.GRPO
    values = baseline_adjusted(scores, estimator, K)
    adv = token_advantages(values, cu)
    # verl's loop form computes in the scores' float64; its vectorised GRPO takes the group
    # statistics in fp32 (groupwise.group_mean_std): O(1) values, a few fp32 roundings.
    for fn, tol in zip(fns, [F64_TOL, dict(rtol=1e-6, atol=1e-6)]):
        ref, _ = fn(rewards.clone(), mask, index, **kw)
        torch.testing.assert_close(values, ref[torch.arange(len(scores)), 0].to(f64), **tol)
    # token_advantages is fp32 by contract: one rounding of each value (≤ 6e-8 relative)
    ref, _ = fns[0](rewards.clone(), mask, index, **kw)
    torch.testing.assert_close(adv, unpad(ref, mask).float(), rtol=1.2e-7, atol=0)


def _kl_rewards(g, cu, coef=0.05, estimator="k1"):
    n = int(cu[-1])
    logp = -torch.rand(n, generator=g, dtype=f64) * 3
    ref = logp + 0.5 * torch.randn(n, generator=g, dtype=f64)
    return logp, ref, -coef * kl_estimate(logp, ref, estimator)


def test_remax_with_kl_rewards_matches_verl():
    ca = peers.verl().core_algos
    g, cu, _ = ragged(1)
    scores = torch.randn(cu.numel() - 1, generator=g, dtype=f64)
    greedy = torch.randn(len(scores) // K, generator=g, dtype=f64)
    _, _, kl_r = _kl_rewards(g, cu)
    packed = kl_r.clone()
    packed[cu[1:].long() - 1] += scores
    rewards, mask = spread(packed, cu, g)
    ref_adv, ref_ret = ca.compute_remax_outcome_advantage(rewards, greedy.repeat_interleave(K), mask)
    adv = token_advantages(baseline_adjusted(scores, "remax", K, greedy_scores=greedy), cu,
                           token_rewards=kl_r)
    torch.testing.assert_close(adv.double(), unpad(ref_adv, mask), **FP32_TOL)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_verl(gamma):
    """With per-token KL rewards, γ, and observation tokens (mask 0) inside responses that verl
    skips: meshrl packs only the actions."""
    ca = peers.verl().core_algos
    g, cu, _ = ragged(2)
    scores = torch.randn(cu.numel() - 1, generator=g, dtype=f64)
    _, _, kl_r = _kl_rewards(g, cu)
    packed = kl_r.clone()
    packed[cu[1:].long() - 1] += scores
    rewards, mask = spread(packed, cu, g, holes=3, fill=7.0)  # hole rewards must be ignored
    ref_adv, ref_ret = ca.compute_reinforce_plus_plus_outcome_advantage(
        rewards, mask, config=peers.AlgoConfig(gamma=gamma))
    values = baseline_adjusted(scores, "reinforce_pp", K)
    ret = token_advantages(values, cu, token_rewards=kl_r, gamma=gamma)
    torch.testing.assert_close(ret.double(), unpad(ref_ret, mask), **FP32_TOL)
    adv = token_advantages(values, cu, token_rewards=kl_r, gamma=gamma, whiten=True)
    torch.testing.assert_close(adv.double(), unpad(_bessel(ref_adv, ref_ret, mask), mask), **FP32_TOL)


def test_reinforce_pp_baseline_without_kl_matches_verl():
    """RPP_BASELINE: verl broadcasts the centred score (no per-token return), so no KL reward."""
    ca = peers.verl().core_algos
    g, cu, _ = ragged(3)
    scores = _scores(g, cu.numel() - 1)
    rewards, mask = _outcome_rewards(scores, cu, g)
    index = np.repeat(np.arange(len(scores) // K), K)
    ref, _ = ca.compute_reinforce_plus_plus_baseline_outcome_advantage(rewards, mask, index)
    adv = token_advantages(baseline_adjusted(scores, "reinforce_pp_baseline", K), cu, whiten=True)
    # what verl whitened: the centred score broadcast over each response's actions
    centred = (scores.view(-1, K) - scores.view(-1, K).mean(1, keepdim=True)).view(-1)
    x, _ = spread(centred.repeat_interleave((cu[1:] - cu[:-1]).long()), cu, g)
    torch.testing.assert_close(adv.double(), unpad(_bessel(ref, x, mask), mask), **FP32_TOL)


@pytest.mark.parametrize("gamma, lam, bootstrap", [(1.0, 1.0, False), (0.95, 0.9, False),
                                                  (0.99, 0.95, True)])
def test_gae_matches_verl(gamma, lam, bootstrap):
    ca = peers.verl().core_algos
    g, cu, _ = ragged(4)
    n, B = int(cu[-1]), cu.numel() - 1
    r = 0.3 * torch.randn(n, generator=g, dtype=f64)
    v = torch.randn(n, generator=g, dtype=f64)
    boot = torch.randn(B, generator=g, dtype=f64) if bootstrap else None
    r_verl = r.clone()
    if bootstrap:  # BOOTSTRAP: fold γ·V_boot into the last action's reward for verl
        r_verl[cu[1:].long() - 1] += gamma * boot
    seed = int(torch.randint(0, 2**31, (), generator=g))
    rewards, mask = spread(r_verl, cu, torch.Generator().manual_seed(seed), holes=2, fill=5.0)
    values, _ = spread(v, cu, torch.Generator().manual_seed(seed), holes=2, fill=-3.0)
    ref_adv, ref_ret = ca.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    adv, ret = gae(r, v, cu, bootstrap_values=boot, gamma=gamma, lam=lam)
    torch.testing.assert_close(ret.double(), unpad(ref_ret, mask), **FP32_TOL)
    ref_raw = ref_ret - values  # verl's advantages before its whitening
    torch.testing.assert_close(masked_whiten(adv).double(), unpad(_bessel(ref_adv, ref_raw, mask), mask),
                               **FP32_TOL)


# --- OpenRLHF ----------------------------------------------------------------------------------

OPENRLHF = {  # OpenRLHF's estimator -> (meshrl's estimator, whitened, GRPO_EPS)
    "rloo": ("rloo", False, 1e-6), "dr_grpo": ("dr_grpo", False, 1e-6),
    "group_norm": ("grpo", False, 1e-9), "reinforce_baseline": ("reinforce_pp_baseline", True, 1e-6),
    "reinforce": ("reinforce_pp", True, 1e-6), "gae": (None, True, None)}


def _experiences(order, cu, logp, ref, scores, values, estimator, g):
    """Two experiences (micro-batches) holding the samples in ``order``, OpenRLHF's KL from its
    own compute_approx_kl."""
    kl_fn = peers.openrlhf().utils.compute_approx_kl
    exps = []
    for part in order.chunk(2):
        lens = (cu[1:] - cu[:-1])[part]
        sub_cu = torch.zeros(len(part) + 1, dtype=torch.int32)
        sub_cu[1:] = torch.cumsum(lens, 0)
        take = torch.cat([torch.arange(int(cu[i]), int(cu[i + 1])) for i in part.tolist()])
        lp, m = spread(logp[take], sub_cu, g)
        rp, _ = spread(ref[take], sub_cu, g)
        v, _ = spread(values[take], sub_cu, g)
        exps.append(OpenRLHFExperience(rewards=scores[part].clone(), index=part.tolist(),
                                       kl=kl_fn(lp, rp, kl_estimator=estimator), action_mask=m,
                                       values=v))
    return exps


def _packed(exps, cu, attr):
    """OpenRLHF's per-experience padded ``attr`` back to meshrl's packed order."""
    rows = {}
    for e in exps:
        for i, b in enumerate(e.index):
            rows[b] = getattr(e, attr)[i][e.action_mask[i].bool()]
    return torch.cat([rows[b] for b in range(cu.numel() - 1)])


@pytest.mark.parametrize("estimator", list(OPENRLHF))
@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_estimators_with_kl_reward_match_openrlhf(estimator, kl_estimator):
    """The KL per token in the reward (compute_reward), returns-to-go, whitening over every action
    of the batch with the biased variance (gae, reinforce, reinforce_baseline)."""
    g, cu, _ = ragged(5)
    B, n = cu.numel() - 1, int(cu[-1])
    scores = _scores(g, B)
    logp = -torch.rand(n, generator=g, dtype=f64) * 3
    ref = logp + 0.5 * torch.randn(n, generator=g, dtype=f64)
    values = torch.randn(n, generator=g, dtype=f64)
    order = torch.randperm(B, generator=g)  # experiences hold shuffled samples; `index` maps back
    kl_coef, gamma, lam = 0.05, (0.9 if estimator in ("reinforce", "gae") else 1.0), 0.95
    exps = _experiences(order, cu, logp, ref, scores, values, kl_estimator, g)
    peers.openrlhf_advantages(exps, estimator=estimator, n_samples_per_prompt=K, kl_coef=kl_coef,
                              gamma=gamma, lambd=lam)
    ref_adv, ref_ret = _packed(exps, cu, "advantages"), _packed(exps, cu, "returns")

    token_rewards = -kl_coef * kl_estimate(logp, ref, kl_estimator)
    mine, whiten, eps = OPENRLHF[estimator]
    if mine is None:  # GAE with the critic's values
        rewards = token_rewards.clone()
        rewards[cu[1:].long() - 1] += scores
        adv, ret = gae(rewards, values, cu, gamma=gamma, lam=lam)
        adv = masked_whiten(adv)
    else:
        vals = baseline_adjusted(scores, mine, K, eps=eps)
        ret = token_advantages(vals, cu, token_rewards=token_rewards, gamma=gamma)
        adv = token_advantages(vals, cu, token_rewards=token_rewards, gamma=gamma, whiten=whiten)
    torch.testing.assert_close(ret.double(), ref_ret.double(), **FP32_TOL)
    torch.testing.assert_close(adv.double(), ref_adv.double(), **FP32_TOL)


# --- TRL ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_group_scaling_matches_trl(scale_rewards):
    """TRL's GRPO advantages live inside ``GRPOTrainer._generate_and_score_completions``; the lines
    below are trl/trainer/grpo_trainer.py lines 2765-2787 (TRL 1.16.0) for scale_rewards "group"
    and "none", verbatim, with TRL's own ``nanstd`` (sample std). GRPO_EPS: TRL's ε is 1e-4."""
    nanstd = peers.trl().nanstd
    g, cu, _ = ragged(6)
    rewards = _scores(g, cu.numel() - 1)
    num_generations = K
    # --- TRL 1.16.0, grpo_trainer.py:2765-2787 ---
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    # ---
    mine = baseline_adjusted(rewards, "grpo" if scale_rewards == "group" else "dr_grpo", K, eps=1e-4)
    # nanstd's Bessel factor count/(count − 1) divides integer counts, so it is fp32 (4/3 to
    # ~1.5e-8 relative) even for float64 rewards
    torch.testing.assert_close(mine, advantages, rtol=1e-7, atol=1e-12)
