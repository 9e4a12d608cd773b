"""Each algorithm's dataflow, declared once as data: its model function calls, the phases they run
in, what each consumes and produces and how often. The runtime's loops run these phases
(`RunContext.flow`), and the planner prices the same rows (`meshrl.planning.plan`), so what is
executed and what is estimated cannot drift apart. Call names are string literals here, in configs
and in tests only; code names a call by the constants below.

A **phase** is a set of calls issued before one gather of their results: calls on disjoint meshes
compute at the same time, calls sharing a rank run one after the other there. A call runs in the
layout of its **config call** (``calls.NAME`` of a run config): its own, or another call's (the
actor's old log-probs run in the actor's training layout). A call **runs** in a given run when its
config call is laid out and its condition holds (`Dataflow.rows`).

How often: ``step`` once per optimizer step of the loop (a PPO iteration, a DPO batch), ``update``
once per minibatch update (epochs × minibatches per PPO/GRPO step), ``round`` once per online round
of iterative DPO (before the round's steps). Weight movements that are not calls — a view refilled
from its model's home layout when the home weights changed, the EMA reference's blend, the round's
result becoming the next reference — are `Blend` rows and reallocations, priced by the planner from
the same table.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshrl.parallel.layout import format_ranks

# the calls, by name (config keys under ``calls:``; `actor_inf` runs in actor_train's layout)
ACTOR_GEN, ACTOR_INF, ACTOR_TRAIN = "actor_gen", "actor_inf", "actor_train"
CRITIC_INF, CRITIC_TRAIN = "critic_inf", "critic_train"
REF_INF, REW_INF, RM_TRAIN = "ref_inf", "rew_inf", "rm_train"

# what a call does with its model
GENERATE, INFER, TRAIN = "gen", "inf", "train"
# how often it runs
STEP, UPDATE, ROUND = "step", "update", "round"

# the timer (``time/dataflow`` in metrics.jsonl) of a step's whole dataflow, wall time: every
# phase (its calls and their gather), refill and blend, calls on disjoint meshes overlapping. It is
# what the planner prices as the step (each call also has its own ``time/<call>``)
DATAFLOW_TIMER = "dataflow"


@dataclass(frozen=True)
class Call:
    """One model function call of a dataflow."""
    name: str
    model: str | None          # the default model (a key of ``models:``); None: ``reward.model`` names it
    kind: str                  # GENERATE | INFER | TRAIN
    consumes: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()
    head: str = "lm"           # lm | value (critics and reward models read a scalar head)
    layout: str | None = None  # the config call whose layout it runs in (default: its own)
    every: str = STEP
    when: str | None = None    # a condition of CONDITIONS, or None (always, when laid out)

    @property
    def config_call(self) -> str:
        return self.layout or self.name


@dataclass(frozen=True)
class Phase:
    name: str
    calls: tuple[Call, ...]


@dataclass(frozen=True)
class Blend:
    """``dst``'s model ← α·dst + (1−α)·src's (EMA), or a copy: a weight move between two models."""
    dst: str       # config calls naming the two models
    src: str
    every: str
    when: str | None = None


# Conditions on the run config (read by attribute, so this module needs nothing of the runtime).
CONDITIONS = {
    "reference": lambda cfg: cfg.algorithm == "ppo" or cfg.grpo.kl_coef > 0,  # GRPO: only with a KL
    "critic": lambda cfg: cfg.algorithm == "ppo",
    "ema_ref": lambda cfg: cfg.algorithm == "ppo" and cfg.ppo.ema_ref,
    "online": lambda cfg: cfg.algorithm == "dpo" and bool(cfg.dpo.rounds),
}


@dataclass(frozen=True)
class Dataflow:
    algorithm: str
    phases: tuple[Phase, ...]
    blends: tuple[Blend, ...] = ()

    def calls(self) -> list[Call]:
        return [c for ph in self.phases for c in ph.calls]

    def config_calls(self) -> dict[str, Call]:
        """The calls a config may lay out (``calls.NAME``), each as the call that owns the layout."""
        return {c.name: c for c in self.calls() if c.layout is None}

    def phase(self, name: str) -> Phase:
        return next(ph for ph in self.phases if ph.name == name)

    def runs(self, call: Call, cfg, laid_out) -> bool:
        """Whether ``call`` runs in this run: its config call is laid out and its condition holds."""
        return call.config_call in laid_out and (call.when is None or CONDITIONS[call.when](cfg))

    def rows(self, cfg, laid_out) -> list[tuple[int, Call]]:
        """(phase index, call) of every call that runs, in the runtime's order."""
        return [(i, c) for i, ph in enumerate(self.phases) for c in ph.calls if self.runs(c, cfg, laid_out)]

    def active_blends(self, cfg, laid_out) -> list[Blend]:
        return [b for b in self.blends if b.dst in laid_out and b.src in laid_out
                and (b.when is None or CONDITIONS[b.when](cfg))]


def _policy_gradient(algorithm: str) -> Dataflow:
    critic = algorithm == "ppo"
    infer = [Call(ACTOR_INF, "actor", INFER, ("responses",), ("old_logp",), layout=ACTOR_TRAIN),
             Call(REF_INF, "ref", INFER, ("responses",), ("ref_logp",), when="reference")]
    train = [Call(ACTOR_TRAIN, "actor", TRAIN, ("old_logp", "advantages"), ("actor weights",), every=UPDATE)]
    if critic:
        infer.append(Call(CRITIC_INF, "critic", INFER, ("responses",), ("values",), head="value"))
        train.append(Call(CRITIC_TRAIN, "critic", TRAIN, ("returns", "values"), ("critic weights",),
                          head="value", every=UPDATE))
    return Dataflow(algorithm, (
        Phase("generate", (Call(ACTOR_GEN, "actor", GENERATE, ("prompts", "actor weights"),
                                ("responses", "gen_logp")),)),
        Phase("score", (Call(REW_INF, None, INFER, ("responses",), ("scores",), head="value"),)),
        Phase("infer", tuple(infer)),
        Phase("train", tuple(train)),
    ), blends=(Blend(REF_INF, ACTOR_TRAIN, UPDATE, when="ema_ref"),) if critic else ())


DATAFLOWS: dict[str, Dataflow] = {
    "ppo": _policy_gradient("ppo"),
    "grpo": _policy_gradient("grpo"),
    "dpo": Dataflow("dpo", (
        Phase("generate", (Call(ACTOR_GEN, "actor", GENERATE, ("prompts", "actor weights"), ("responses",),
                                every=ROUND, when="online"),)),
        Phase("score", (Call(REW_INF, None, INFER, ("responses",), ("scores", "pairs"), head="value",
                             every=ROUND, when="online"),)),
        Phase("infer", (Call(REF_INF, "ref", INFER, ("pairs",), ("ref_logp",)),)),
        Phase("train", (Call(ACTOR_TRAIN, "actor", TRAIN, ("pairs", "ref_logp"), ("actor weights",)),)),
    ), blends=(Blend(REF_INF, ACTOR_TRAIN, ROUND, when="online"),)),
    "sft": Dataflow("sft", (Phase("train", (Call(ACTOR_TRAIN, "actor", TRAIN, ("examples",),
                                                 ("actor weights",)),)),)),
    "rm": Dataflow("rm", (Phase("train", (Call(RM_TRAIN, "reward", TRAIN, ("pairs",), ("reward weights",),
                                               head="value"),)),)),
}

# Trained calls, in the order that picks a model's home layout (its first training call).
TRAIN_CALLS = tuple(dict.fromkeys(c.name for f in DATAFLOWS.values() for c in f.calls() if c.kind == TRAIN))
# Calls whose model reads a scalar head.
VALUE_CALLS = tuple(sorted({c.name for f in DATAFLOWS.values() for c in f.calls() if c.head == "value"}))


def dataflow(algorithm: str) -> Dataflow:
    return DATAFLOWS[algorithm]


def async_overlap(calls: Mapping[str, Iterable[int]]) -> tuple[str, tuple[int, ...]] | None:
    """Asynchronous RL runs actor_gen beside every other call, so its ranks must be theirs alone.
    ``calls``: every laid-out config call's global ranks. The first call by name that shares a
    rank with actor_gen, and the ranks they share (ascending); None when none does (or when
    actor_gen is not laid out)."""
    if ACTOR_GEN not in calls:
        return None
    gen = set(calls[ACTOR_GEN])
    for name in sorted(calls):
        shared = gen.intersection(calls[name]) if name != ACTOR_GEN else ()
        if shared:
            return name, tuple(sorted(shared))
    return None


def async_overlap_error(max_staleness: int, calls: Mapping[str, Iterable[int]]) -> str | None:
    """`async_overlap` as the one-line message the planner and the runtime both raise; None when
    synchronous (max_staleness 0) or when actor_gen's ranks are its own."""
    hit = async_overlap(calls) if max_staleness > 0 else None
    if hit is None:
        return None
    other, shared = hit
    return (f"async.max_staleness={max_staleness} overlaps generation with training, so "
            f"calls.{ACTOR_GEN} needs ranks no other call uses: it shares rank(s) {format_ranks(shared)} "
            f"with calls.{other}; give {ACTOR_GEN} ranks of its own")
