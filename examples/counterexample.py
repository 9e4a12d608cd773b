"""DPO vs PPO on out-of-distribution responses: Table 1 and the §4.2 synthetic run of Xu et al.,
"Is DPO Superior to PPO for LLM Alignment?" (ICML 2024), trained with meshrl's own losses.

    python examples/counterexample.py [--json] [--seeds N]

Part 1 (Table 1): one prompt, responses y1, y2, y3, π_ref = (0.5, 0.5, 0), one pair y1 ≻ y2. The
DPO loss cannot tell π = (0.1, 0, 0.9) from (1, 0, 0): y3 appears in no pair, so nothing in the
loss constrains it. PPO with a reward model learned from the same pair ends at ≈ (1, 0, 0): the KL
penalty to a reference with (near-)zero mass on y3 forbids moving mass there, and y3 is never even
sampled. Zeros are replaced by ε (log 0 = −inf); see COUNTEREXAMPLE.md for the choices.

Part 2 (§4.2): 8 prompts × 8 responses, one-hot prompts, MLP policy and reward model, response i
optimal for prompt i, preference pairs covering 3 responses per prompt. It measures the mass DPO
and PPO put on the 5 responses no pair contains, before and after training, over several seeds.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

from meshrl.engine.algorithms.losses import (bradley_terry_loss, dpo_loss, ppo_policy_loss,
                                             ppo_value_loss, sft_loss, shape_rewards)
from meshrl.kernels.gae import gae
from meshrl.kernels.whiten import masked_whiten

BETA = 0.1  # DPO's β and PPO's KL coefficient: both then target max E[r] − β·KL(π‖π_ref)
TABLE1_EPS = 1e-64
SYN = dict(prompts=8, responses=8, covered=3, hidden=64, sft_lr=1e-2,
           dpo_steps=300, dpo_lr=1e-3, rm_steps=300, rm_lr=1e-2, ppo_iters=150,
           ppo_samples=32, ppo_minibatches=2, actor_lr=1e-3, critic_lr=1e-2)
# SFT steps of the reference. "sft_long" leaves ~0 mass on uncovered responses (the theory's
# π_ref(OOD) = 0); "sft_short" stops early so that about a tenth of the mass stays there, like the
# paper's starting point (0.11).
REFERENCES = {"sft_long": 60, "sft_short": 15}
WHO = ("reference", "dpo", "ppo", "ppo_kl_optimum")


# --- PPO on a contextual bandit (each response is one action) --------------------------------

def ppo_bandit(actor, critic, params, ref_logp_table, score_fn, n_prompts, *, iters, samples,
               minibatches, actor_lr, critic_lr, gen):
    """PPO with meshrl's reward shaping (k1 KL in the reward), GAE and clipped losses.

    actor() / critic() map all prompts to logits [P, K] / values [P]; params = (actor's, critic's);
    ref_logp_table is log π_ref [P, K]; score_fn(prompt_idx, actions) -> scores (the reward model).
    Returns the final policy [P, K]. Advantages are whitened over the batch (DESIGN's default).
    No value clip: the critic starts at 0 while scores reach ±15, and a 0.2 clip would hold it
    back for dozens of updates.
    """
    opt_a = torch.optim.Adam(params[0], lr=actor_lr)
    opt_c = torch.optim.Adam(params[1], lr=critic_lr)
    prompt_idx = torch.arange(n_prompts).repeat_interleave(samples)
    n = prompt_idx.numel()
    cu = torch.arange(n + 1, dtype=torch.int32)  # one action per response
    for _ in range(iters):
        with torch.no_grad():
            logp_table = F.log_softmax(actor(), dim=-1)
            actions = torch.multinomial(logp_table.exp()[prompt_idx], 1, generator=gen).squeeze(1)
            old_logp = logp_table[prompt_idx, actions]
            ref_logp = ref_logp_table[prompt_idx, actions]
            rewards = shape_rewards(score_fn(prompt_idx, actions), old_logp, ref_logp, cu,
                                    kl_coef=BETA, reward_clip=20.0, estimator="k1")
            old_values = critic()[prompt_idx].float()
            adv, returns = gae(rewards.float(), old_values, cu)
            adv = masked_whiten(adv)
        for mb in torch.randperm(n, generator=gen).chunk(minibatches):
            logp = F.log_softmax(actor(), dim=-1)[prompt_idx[mb], actions[mb]]
            loss, _ = ppo_policy_loss(logp, old_logp[mb], adv[mb], num_tokens=mb.numel())
            vloss, _ = ppo_value_loss(critic()[prompt_idx[mb]], old_values[mb], returns[mb],
                                      value_clip=None, num_tokens=mb.numel())
            opt_a.zero_grad()
            opt_c.zero_grad()
            (loss + vloss).backward()
            opt_a.step()
            opt_c.step()
    with torch.no_grad():
        return F.softmax(actor(), dim=-1)


class Table(nn.Module):
    """Free parameters returned as they are: a tabular policy, value or reward."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.p = nn.Parameter(init.clone())

    def forward(self):
        return self.p


def train_bt(scores, params, *, steps, lr, penalty=None):
    """Fit a reward model with meshrl's Bradley–Terry loss; scores() -> (r_chosen, r_rejected)."""
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss, metrics = bradley_terry_loss(*scores())
        if penalty is not None:
            loss = loss + penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: float(v) for k, v in metrics.items()}


# --- Part 1: Table 1 -------------------------------------------------------------------------

def table1_dpo_losses(eps: float) -> tuple[float, float]:
    """meshrl's DPO loss (β = 0.1) of π_a = (0.1, ε, 0.9 − ε) and π_b = (1 − 2ε, ε, ε)."""
    ref = torch.tensor([0.5, 0.5, eps], dtype=torch.float64).log()
    out = []
    for pi in ([0.1, eps, 0.9 - eps], [1.0 - 2 * eps, eps, eps]):
        logp = torch.tensor(pi, dtype=torch.float64).log()
        loss, _ = dpo_loss(logp[:1], logp[1:2], ref[:1], ref[1:2], beta=BETA)
        out.append(float(loss))
    return out[0], out[1]


def table1_dpo_losses_at_reference() -> float:
    """The starting point for scale: π = π_ref gives margin 0, loss log 2."""
    ref = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    return float(dpo_loss(ref[:1], ref[1:], ref[:1], ref[1:], beta=BETA)[0])


def table1_ppo(r3: float, seed: int) -> dict:
    """Tabular BT reward model from y1 ≻ y2, then PPO on a 3-arm softmax policy from π_ref.

    r(y3) is a parameter like the others, but no pair contains y3, so it gets no gradient and
    stays at its initial value r3. An L2 penalty on r(y1), r(y2) keeps their gap finite (on one
    separable pair the BT loss alone would push it to infinity): it settles where
    σ(−2c) = 2λc, c ≈ 1.05 for λ = 0.05.
    """
    gen = torch.Generator().manual_seed(seed)
    rm = Table(torch.tensor([0.0, 0.0, r3], dtype=torch.float64))
    train_bt(lambda: (rm()[:1], rm()[1:2]), [rm.p], steps=500, lr=0.05,
             penalty=lambda: 0.05 * (rm.p[:2] ** 2).sum())
    r = rm.p.detach()
    ref_logp = torch.tensor([[0.5, 0.5, TABLE1_EPS]], dtype=torch.float64).log()
    actor, critic = Table(ref_logp), Table(torch.zeros(1, dtype=torch.float64))
    policy = ppo_bandit(actor, critic, (actor.parameters(), critic.parameters()), ref_logp,
                        lambda p, a: r[a], 1, iters=200, samples=64, minibatches=2,
                        actor_lr=0.05, critic_lr=0.05, gen=gen)
    return {"reward_model": r.tolist(), "policy": policy[0].tolist()}


def table1(seed: int = 0) -> dict:
    loss_a, loss_b = table1_dpo_losses(TABLE1_EPS)
    return {
        "eps": TABLE1_EPS,
        "beta": BETA,
        "dpo_loss_pi_0.1_0_0.9": loss_a,
        "dpo_loss_pi_1_0_0": loss_b,
        "dpo_loss_at_reference": table1_dpo_losses_at_reference(),
        "dpo_loss_vs_eps": [dict(zip(("eps", "pi_0.1_0_0.9", "pi_1_0_0"),
                                     (e, *table1_dpo_losses(e))))
                            for e in (1e-4, 1e-8, 1e-16, 1e-64)],
        "ppo": table1_ppo(0.0, seed),
        # A reward model that happens to rate the unseen y3 far above y1: PPO still cannot go there.
        "ppo_r3_high": table1_ppo(5.0, seed),
    }


# --- Part 2: the §4.2 synthetic run ----------------------------------------------------------

def mlp(n_in: int, n_out: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


def make_pairs(seed: int, cfg: dict):
    """Coverage and pairs: prompt x covers its optimal response x plus `covered − 1` random others;
    every pair among the covered responses, labelled by the true reward −((y − x) mod K)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    n_p, n_r = cfg["prompts"], cfg["responses"]
    covered = torch.zeros(n_p, n_r, dtype=torch.bool)
    rows = []
    for x in range(n_p):
        others = [y for y in torch.randperm(n_r, generator=gen).tolist() if y != x]
        ys = [x] + others[:cfg["covered"] - 1]
        covered[x, ys] = True
        for i, a in enumerate(ys):
            for b in ys[i + 1:]:
                best, worst = sorted((a, b), key=lambda y: (y - x) % n_r)
                rows.append((x, best, worst))
    px, ch, rj = torch.tensor(rows).T
    return covered, px, ch, rj


def mass_stats(policy: torch.Tensor, covered: torch.Tensor) -> dict:
    return {"uncovered": float((policy * ~covered).sum(1).mean()),
            "optimal": float(policy.diagonal().mean())}


def train_sft(policy, x, covered, steps, cfg):
    """Reference = SFT on every (prompt, response) the pairs contain, for a fixed budget."""
    px, ys = covered.nonzero(as_tuple=True)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg["sft_lr"])
    for _ in range(steps):
        logp = F.log_softmax(policy(x), dim=-1)[px, ys]
        loss, _ = sft_loss(logp)
        opt.zero_grad()
        loss.backward()
        opt.step()


def train_dpo(policy, x, ref_logp, px, ch, rj, cfg):
    opt = torch.optim.Adam(policy.parameters(), lr=cfg["dpo_lr"])
    for _ in range(cfg["dpo_steps"]):
        logp = F.log_softmax(policy(x), dim=-1)
        loss, metrics = dpo_loss(logp[px, ch], logp[px, rj], ref_logp[px, ch], ref_logp[px, rj],
                                 beta=BETA)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: float(v) for k, v in metrics.items()}


def synthetic_seed(seed: int, sft_steps: int, cfg: dict = SYN) -> dict:
    n_p, n_r, h = cfg["prompts"], cfg["responses"], cfg["hidden"]
    covered, px, ch, rj = make_pairs(seed, cfg)
    x = torch.eye(n_p)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        reference, rm, critic = mlp(n_p, n_r, h), mlp(n_p + n_r, 1, h), mlp(n_p, 1, h)
    train_sft(reference, x, covered, sft_steps, cfg)
    with torch.no_grad():
        ref_logp = F.log_softmax(reference(x), dim=-1)
    dpo_policy = copy.deepcopy(reference)
    dpo_metrics = train_dpo(dpo_policy, x, ref_logp, px, ch, rj, cfg)

    def score(p, a):
        return rm(torch.cat([x[p], torch.eye(n_r)[a]], dim=1)).squeeze(-1)

    rm_metrics = train_bt(lambda: (score(px, ch), score(px, rj)), list(rm.parameters()),
                          steps=cfg["rm_steps"], lr=cfg["rm_lr"])
    rm.requires_grad_(False)
    with torch.no_grad():
        all_p, all_y = torch.arange(n_p).repeat_interleave(n_r), torch.arange(n_r).repeat(n_p)
        rm_table = score(all_p, all_y).view(n_p, n_r)
    actor = copy.deepcopy(reference)
    ppo_policy = ppo_bandit(lambda: actor(x), lambda: critic(x).squeeze(-1),
                            (actor.parameters(), critic.parameters()), ref_logp, score, n_p,
                            iters=cfg["ppo_iters"], samples=cfg["ppo_samples"],
                            minibatches=cfg["ppo_minibatches"], actor_lr=cfg["actor_lr"],
                            critic_lr=cfg["critic_lr"], gen=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        dpo_pi = F.softmax(dpo_policy(x), dim=-1)
        # Diagnostic only (nothing is trained on it): the optimum of E[r] − β·KL(π‖π_ref) under
        # the learned reward, π_ref·exp(r/β)/Z, which PPO should approach.
        kl_optimum = F.softmax(ref_logp + rm_table / BETA, dim=-1)
    return {
        "seed": seed,
        "reference": mass_stats(ref_logp.exp(), covered),
        "dpo": {**mass_stats(dpo_pi, covered), "train": dpo_metrics},
        "ppo": mass_stats(ppo_policy, covered),
        "ppo_kl_optimum": mass_stats(kl_optimum, covered),
        "rm": {**rm_metrics,
               # Prompts whose learned reward ranks an uncovered response first: PPO's only way to
               # gain from OOD mass.
               "argmax_uncovered_frac": float((~covered).gather(
                   1, rm_table.argmax(1, keepdim=True)).float().mean())},
    }


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def synthetic(seeds: int) -> dict:
    out = {"seeds": seeds, "config": dict(SYN, beta=BETA, reference_sft_steps=REFERENCES)}
    for name, sft_steps in REFERENCES.items():
        runs = [synthetic_seed(s, sft_steps) for s in range(seeds)]
        summary = {f"{kind}_{who}": mean_std([r[who][kind] for r in runs])
                   for kind in ("uncovered", "optimal") for who in WHO}
        summary["rm_argmax_uncovered_frac"] = mean_std([r["rm"]["argmax_uncovered_frac"]
                                                        for r in runs])
        out[name] = {"summary": summary, "per_seed": runs}
    return out


# --- report ------------------------------------------------------------------------------------

def print_report(out: dict) -> None:
    t = out["table1"]
    print(f"Table 1 (π_ref = 0.5/0.5/ε, ε = {t['eps']:g}, pair y1 ≻ y2, β = {t['beta']})")
    print(f"  DPO loss of π = 0.1/0/0.9 : {t['dpo_loss_pi_0.1_0_0.9']:.3e}")
    print(f"  DPO loss of π = 1/0/0     : {t['dpo_loss_pi_1_0_0']:.3e}   (infimum 0; "
          f"{t['dpo_loss_at_reference']:.4f} at π = π_ref)")
    for row in t["dpo_loss_vs_eps"]:
        print(f"    ε = {row['eps']:<8g} {row['pi_0.1_0_0.9']:.3e}  {row['pi_1_0_0']:.3e}")
    for key, label in (("ppo", "r(y3) at init 0"), ("ppo_r3_high", "r(y3) set to +5")):
        r, pi = t[key]["reward_model"], t[key]["policy"]
        print(f"  PPO, {label}: RM = {', '.join(f'{v:+.2f}' for v in r)}  ->  π = "
              f"{pi[0]:.4f} / {pi[1]:.2e} / {pi[2]:.2e}")
    syn = out["synthetic"]
    print(f"\n§4.2 synthetic: mass on the responses no pair contains, and on the optimal one; "
          f"{syn['seeds']} seeds, mean ± std")
    for name, steps in REFERENCES.items():
        s = syn[name]["summary"]
        print(f"  reference = {name} ({steps} SFT steps)")
        print(f"    {'':<16}{'uncovered':>18}{'optimal':>18}")
        for who in WHO:
            u, o = s[f"uncovered_{who}"], s[f"optimal_{who}"]
            print(f"    {who:<16}{u['mean']:>10.3f} ± {u['std']:.3f}"
                  f"{o['mean']:>10.3f} ± {o['std']:.3f}")
        a = s["rm_argmax_uncovered_frac"]
        print(f"    prompts whose learned RM ranks an uncovered response first: "
              f"{a['mean']:.3f} ± {a['std']:.3f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the synthetic run (default 5)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    out = {"paper": "Xu et al., Is DPO Superior to PPO for LLM Alignment? (ICML 2024)",
           "table1": table1(), "synthetic": synthetic(args.seeds)}
    if args.json:
        print(json.dumps(out))
    else:
        print_report(out)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
