"""Value checks on a run config, made before anything loads: counts at least 1, coefficients not
negative, probabilities in range, names from their lists. Each failure is one line naming the key,
its value and what it must be. ``None`` (an unset optional field) always passes."""
from __future__ import annotations

from meshrl.engine.algorithms.advantages import ESTIMATORS
from meshrl.engine.algorithms.dpo_losses import LOSS_TYPES
from meshrl.engine.algorithms.policy_losses import AGGREGATIONS, CORRECTIONS, POLICY_LOSSES
from meshrl.engine.algorithms.ppo_losses import KL_ESTIMATORS
from meshrl.engine.train import SCHEDULES

def _rl(*fields) -> tuple:
    """The fields PPO and the critic-free family share, under both sections."""
    return tuple(f"{sec}.{f}" for f in fields for sec in ("ppo", "grpo"))


AT_LEAST_1 = ("sft.batch_size", "sft.epochs", "sft.steps", "rm.batch_size", "rm.epochs", "rm.steps",
              "dpo.batch_size", "dpo.epochs", "dpo.steps", "dpo.prompts_per_round",
              *_rl("iterations", "batch_size", "minibatches", "epochs", "loss_agg_len"),
              "ppo.kl_horizon", "grpo.group_size", "grpo.max_sampling_rounds",
              "generation.max_new_tokens", "generation.batch_size", "data.max_prompt_len",
              "data.max_len", "cluster.nodes", "cluster.gpus_per_node", "calls.*.tp", "calls.*.pp",
              "calls.*.dp", "calls.*.ep", "calls.*.microbatch_tokens", "async_.sync_every")
AT_LEAST_2 = ("dpo.samples_per_prompt",)  # a pair (grpo.group_size: checked with its estimator)
NOT_NEGATIVE = ("dpo.rounds", "async_.max_staleness", "dpo.sft_coef",
                *_rl("kl_coef", "entropy_coef", "overlong_buffer", "overlong_penalty"), "ppo.value_clip",
                "logging.eval_every", "logging.save_every", "logging.keep_checkpoints",
                "logging.dump_rollouts",
                "generation.min_new_tokens", "generation.top_k", "data.eval_samples",
                "models.*.optim.lr", "models.*.optim.weight_decay", "models.*.optim.warmup_steps")
POSITIVE = ("generation.temperature", "dpo.beta", *_rl("clip_eps", "clip_eps_low", "clip_eps_high"),
            "ppo.reward_clip", "ppo.kl_target", "models.*.optim.eps", "models.*.optim.max_grad_norm",
            "cluster.gpu_mem_gb", "cluster.intra_node_gbps", "cluster.inter_node_gbps", "dist.timeout_s")
# (low, high, low included, high included)
INTERVALS = {"generation.top_p": (0, 1, False, True),
             "logging.stop_at_pass_rate": (0, 1, False, True), "ppo.gamma": (0, 1, True, True),
             "grpo.gamma": (0, 1, True, True), "ppo.lam": (0, 1, True, True),
             "ppo.ema_alpha": (0, 1, True, True),
             "dpo.label_smoothing": (0, 0.5, True, False), "models.*.optim.min_lr_ratio": (0, 1, True, True)}
CHOICES = {"models.*.optim.schedule": SCHEDULES, **{k: tuple(KL_ESTIMATORS) for k in _rl("kl_estimator")},
           **{k: POLICY_LOSSES for k in _rl("policy_loss")}, **{k: AGGREGATIONS for k in _rl("loss_agg")},
           "grpo.advantage": ESTIMATORS, "grpo.kl_in": ("loss", "reward"),
           "dpo.loss_type": LOSS_TYPES, "async_.correction": CORRECTIONS,
           "data.too_long": ("error", "skip")}


def yaml_key(text):
    """A schema key as the YAML spells it: the section ``async_`` (``async`` is a Python keyword)
    is ``async``."""
    return text.replace("async_", "async") if text else text


def values(cfg, pattern: str):
    """(key, value) for every field the dotted pattern names; ``*`` spans a dict's entries."""
    found = [("", cfg)]
    for part in pattern.split("."):
        step = []
        for key, obj in found:
            items = obj.items() if part == "*" else [(part, getattr(obj, part))]
            step += [(f"{key}.{k}" if key else str(k), v) for k, v in items]
        found = step
    return [(k, v) for k, v in found if v is not None]


def check_values(cfg, error) -> None:
    """Raise ``error`` (one line) at the first value out of range."""
    def fail(key, value, need):
        raise error(f"{yaml_key(key)}={value}: {need}")

    for least, patterns in ((1, AT_LEAST_1), (2, AT_LEAST_2)):
        for pattern in patterns:
            for key, v in values(cfg, pattern):
                if v < least:
                    fail(key, v, f"must be at least {least}")
    for pattern in NOT_NEGATIVE:
        for key, v in values(cfg, pattern):
            if v < 0:
                fail(key, v, "must not be negative")
    for pattern in POSITIVE:
        for key, v in values(cfg, pattern):
            if not v > 0:
                fail(key, v, "must be greater than 0")
    for pattern, (lo, hi, lo_in, hi_in) in INTERVALS.items():
        for key, v in values(cfg, pattern):
            if not ((lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi)):
                fail(key, v, f"must lie in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}")
    for pattern, allowed in CHOICES.items():
        for key, v in values(cfg, pattern):
            if v not in allowed:
                fail(key, v, f"use one of {', '.join(allowed)}")
