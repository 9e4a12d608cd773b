"""Run configuration: typed dataclasses merged by omegaconf from YAML and ``key=value`` overrides.

One config type per concern; each model function call names its model and its layout::

    algorithm: ppo
    models:   {actor: {path: ...}, critic: {init_from: actor}, ref: {init_from: actor}}
    calls:    {actor_gen: {model: actor, tp: 1, pp: 1}, actor_train: {model: actor, tp: 2}}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from meshrl.engine.dataflow import REF_INF
from meshrl.engine.generation import ENGINES as GENERATION_ENGINES
from meshrl.engine.train import OptimConfig

from .config_ranges import check_values, yaml_key
from .metrics import check_trackers

ALGORITHMS = ("sft", "rm", "dpo", "ppo", "grpo")
DTYPES = ("fp32", "bf16", "fp16")


class RunConfigError(ValueError):
    """A config meshrl cannot run; one line naming the key and the fix."""


@dataclass(kw_only=True)
class ModelSpec:
    path: Optional[str] = None  # a Hugging Face directory
    init_from: Optional[str] = None  # start from another model's weights (critic from actor)
    scratch: Optional[dict] = None  # a HF-style config dict: initialise from the run's seed
    dtype: str = "fp32"
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    offload_when_idle: bool = False  # park optimizer state on the CPU while other calls run
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(kw_only=True)
class CallSpec:
    model: str = MISSING
    ranks: Optional[str] = None  # "0-7" or "0,2,4"; default: every rank
    tp: int = 1
    pp: int = 1
    dp: Optional[int] = None  # default: len(ranks) / (tp·pp)
    # expert parallelism (MoE models): ep of the dp ranks share out each MoE layer's experts;
    # it divides dp and the model's num_experts
    ep: int = 1
    microbatch_tokens: int = 4096  # upper bound on tokens per microbatch


@dataclass(kw_only=True)
class DataSpec:
    train: Optional[str] = None
    eval: Optional[str] = None
    format: str = "auto"  # prompts: auto; pairs: auto | pairs | hh | saferlhf; sft: auto | hh
    max_prompt_len: int = 256
    max_len: int = 512
    chat_template: bool = False
    preference: str = "better"  # saferlhf: better | safer
    safety_filter: Optional[str] = None  # saferlhf: dual_safe | dual_unsafe
    eval_samples: int = 256
    too_long: str = "error"  # a record over max_len / max_prompt_len: error | skip (counted, reported)


@dataclass(kw_only=True)
class RewardSpec:
    model: Optional[str] = None  # a reward model among `models`
    verifier: Optional[str] = None  # arithmetic | code
    verifier_args: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class GenSpec:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 200
    top_p: float = 1.0
    batch_size: int = 256  # sequences decoded at once per replica (the fast engine's slots)
    engine: str = "auto"  # auto (fast on CUDA, else reference) | fast | reference; MESHRL_GENERATE overrides auto


@dataclass(kw_only=True)
class SFTSpec:
    batch_size: int = 64
    epochs: int = 1
    steps: Optional[int] = None  # stop after this many steps (default: the epochs)


@dataclass(kw_only=True)
class RMSpec:
    batch_size: int = 64
    epochs: int = 1
    steps: Optional[int] = None  # stop after this many steps (default: the epochs)


@dataclass(kw_only=True)
class DPOSpec:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    # a response's log-prob as its mean per token (True) or its sum (False); default: sums for
    # sigmoid (DPO; OpenRLHF), means for ipo (TRL's IPO)
    length_normalize: Optional[bool] = None
    label_smoothing: float = 0.0
    sft_coef: float = 0.0
    batch_size: int = 64  # pairs per step
    epochs: int = 1
    steps: Optional[int] = None  # offline: stop after this many steps (default: the epochs)
    # iterative online DPO: 0 = offline on the data's pairs
    rounds: int = 0
    samples_per_prompt: int = 4
    prompts_per_round: int = 256
    min_margin: Optional[float] = None  # drop pairs whose reward-model margin is smaller


@dataclass(kw_only=True)
class PolicyGradientSpec:
    """What PPO and the critic-free family share: one loop, one advantage estimator and one policy
    loss per run (see README, "The RL algorithm menu")."""
    iterations: int = 100
    batch_size: int = 64  # prompts per iteration
    minibatches: int = 4
    epochs: int = 1
    advantage: str = "gae"  # ppo: gae; grpo: grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline | remax
    policy_loss: str = "clip"  # clip | dual_clip | gspo
    clip_eps: float = 0.2
    clip_eps_low: Optional[float] = None  # default clip_eps
    clip_eps_high: Optional[float] = None  # default clip_eps; DAPO's clip-higher: 0.28
    clip_ratio_c: float = 3.0  # dual_clip: a negative advantage's loss is capped at c·|A|
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm
    loss_agg_len: Optional[int] = None  # seq-mean-token-sum-norm's constant (default generation.max_new_tokens)
    entropy_coef: float = 0.0
    kl_coef: float = 0.1
    kl_estimator: str = "k1"
    # DAPO's length handling: leave truncated responses out of the loss, and/or lower the score
    # linearly over the last overlong_buffer tokens before generation.max_new_tokens (to −penalty)
    overlong_filter: bool = False
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0


@dataclass(kw_only=True)
class PPOSpec(PolicyGradientSpec):
    batch_size: int = 512  # prompts per iteration
    value_clip: float = 0.2
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    reward_clip: float = 20.0
    gamma: float = 1.0
    lam: float = 1.0
    adv_norm: bool = True
    value_norm: bool = True
    ema_ref: bool = False
    ema_alpha: float = 0.999
    truncated: str = "score"  # score | bootstrap
    truncation_penalty: float = 0.0


@dataclass(kw_only=True)
class GRPOSpec(PolicyGradientSpec):
    """The critic-free family: ``advantage`` picks the estimator (GRPO by default)."""
    advantage: str = "grpo"
    group_size: int = 8  # samples per prompt (remax and reinforce_pp may use 1)
    kl_coef: float = 0.04
    kl_estimator: str = "k3"
    kl_in: str = "loss"  # loss (GRPO: k3 in the loss) | reward (REINFORCE++, RLOO: −β·KL per token)
    gamma: float = 1.0  # discount of the per-token returns (REINFORCE++)
    # DAPO's dynamic sampling: groups whose samples all score alike are dropped and more prompts
    # are drawn until batch_size groups are kept, for at most max_sampling_rounds draws per step
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4


@dataclass(kw_only=True)
class AsyncSpec:
    """Asynchronous RL (``async:`` in YAML; PPO, GRPO, iterative DPO): generation on a mesh of its
    own samples the next batches while the other meshes train on the current one. The policy's
    version counts its iterations; a batch sampled with version v is trained from version at most
    v + max_staleness."""
    max_staleness: int = 0  # 0: the synchronous loop
    sync_every: int = 1  # iterations between weight moves to the generation mesh (at most max_staleness)
    # the off-policy correction: decoupled (AReaL's: π_prox/π_behav per token, tokens above imp_cap
    # left out) | tis (verl's truncated IS: the weight clamped at imp_cap) | none;
    # default: decoupled when max_staleness > 0, none at 0
    correction: Optional[str] = None
    imp_cap: Optional[float] = None  # default: decoupled 5.0, tis 2.0


@dataclass(kw_only=True)
class ClusterSpec:
    """The machines a run targets: `meshrl plan` sizes layouts against it; the runtime reads
    ``gpus_per_node`` to tell intra- from inter-node transfers."""
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    intra_node_gbps: float = 3600.0  # NVLink (H100 SXM: 900 GB/s = 7200 Gb/s bidirectional)
    inter_node_gbps: float = 400.0  # one 400 Gb/s InfiniBand NIC per GPU
    device: str = "h100"  # whose measured rates `meshrl plan` uses (benchmarks/rates.json)


@dataclass(kw_only=True)
class LogSpec:
    eval_every: int = 0  # iterations/steps; 0: only at the end
    dump_rollouts: int = 0  # write this many sampled sequences per step to run_dir/rollouts/
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 0  # the newest this many stay, older ones are removed; 0: keep all
    tensorboard: bool = True
    progress: bool = True
    # stop (saving and exporting as at the end) at the first held-out evaluation whose pass rate
    # reaches this; needs data.eval, a verifier and eval_every
    stop_at_pass_rate: Optional[float] = None
    # experiment trackers besides metrics.jsonl and TensorBoard, written by rank 0 under the same
    # phase/name keys; each needs its package (pip install meshrl[trackers])
    wandb: bool = False
    wandb_project: str = "meshrl"
    wandb_mode: str = "offline"  # offline: run_dir/wandb/, upload with `wandb sync` | online | disabled
    mlflow: bool = False
    mlflow_uri: Optional[str] = None  # default: the file store file:RUN_DIR/mlruns
    experiment: Optional[str] = None  # W&B group and MLflow experiment; default: run_dir's basename


@dataclass(kw_only=True)
class DistSpec:
    """Process-group settings (under torchrun)."""
    # no rank making progress for this long is a hang: every rank reports where it is and exits
    # (code 3) so torchrun can restart; collectives themselves time out a grace period later
    timeout_s: float = 1800.0


@dataclass(kw_only=True)
class RunConfig:
    algorithm: str = MISSING
    seed: int = 1
    run_dir: str = "runs/run"
    resume: bool = True  # continue from run_dir's latest checkpoint when there is one
    models: dict[str, ModelSpec] = field(default_factory=dict)
    calls: dict[str, CallSpec] = field(default_factory=dict)
    # calls whose layout `meshrl plan --search` chooses at start-up on the cluster torchrun gives:
    # written `calls: auto` (every call, ["all"]) or `calls.NAME: auto` in the config
    auto_calls: list[str] = field(default_factory=list)
    data: DataSpec = field(default_factory=DataSpec)
    reward: RewardSpec = field(default_factory=RewardSpec)
    generation: GenSpec = field(default_factory=GenSpec)
    sft: SFTSpec = field(default_factory=SFTSpec)
    rm: RMSpec = field(default_factory=RMSpec)
    dpo: DPOSpec = field(default_factory=DPOSpec)
    ppo: PPOSpec = field(default_factory=PPOSpec)
    grpo: GRPOSpec = field(default_factory=GRPOSpec)
    async_: AsyncSpec = field(default_factory=AsyncSpec)  # ``async:`` in YAML (a Python keyword)
    logging: LogSpec = field(default_factory=LogSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    dist: DistSpec = field(default_factory=DistSpec)
    save_hf: bool = True  # write the trained models as HF directories under run_dir/hf/
    extra: dict[str, Any] = field(default_factory=dict)


def load_run_config(path: str | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """YAML file (optional), then ``key=value`` overrides, over the schema's defaults."""
    try:
        cfg, auto = OmegaConf.structured(RunConfig), []
        layers = [OmegaConf.create(base)] if base else []
        if path:
            layers.append(OmegaConf.load(path))
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        for layer in layers:
            _rename_async(layer)
            cfg = OmegaConf.merge(_take_auto_calls(layer, cfg, auto), layer)
        run = OmegaConf.to_object(cfg)
        run.auto_calls = ["all"] if "all" in auto else sorted(set(run.auto_calls) | set(auto))
    except OmegaConfBaseException as e:
        key = yaml_key(getattr(e, "full_key", None))
        msg = yaml_key(str(e).splitlines()[0])
        raise RunConfigError(f"config{(' key ' + key) if key else ''}: {msg}") from None
    except FileNotFoundError:
        raise RunConfigError(f"config file {path} not found: check the path") from None
    validate(run)
    return run


def _rename_async(layer):
    """The YAML section ``async`` into the schema's ``async_`` (``async`` is a Python keyword)."""
    if "async" in layer:
        layer["async_"] = layer.pop("async")


def _take_auto_calls(layer, cfg, auto: list[str]):
    """``calls: auto`` and ``calls.NAME: auto`` out of one config layer into ``auto``, and the
    layouts they replace out of what the earlier layers set; returns ``cfg``."""
    calls = layer.get("calls")
    if calls == "auto":
        auto[:] = ["all"]
        layer.calls, cfg.calls = {}, {}
    elif calls is not None and hasattr(calls, "items"):
        for name in [n for n, v in calls.items() if v == "auto"]:
            auto.append(name)
            del calls[name]
            cfg.calls.pop(name, None)
    return cfg


def validate(cfg: RunConfig) -> None:
    if cfg.algorithm not in ALGORITHMS:
        raise RunConfigError(f"algorithm={cfg.algorithm}: use one of {', '.join(ALGORITHMS)}")
    check_values(cfg, RunConfigError)
    for name, m in cfg.models.items():
        if sum(x is not None for x in (m.path, m.init_from, m.scratch)) != 1:
            raise RunConfigError(f"models.{name}: give exactly one of path, init_from, scratch")
        if m.init_from is not None and m.init_from not in cfg.models:
            raise RunConfigError(f"models.{name}.init_from={m.init_from}: no such model in models")
        if m.dtype not in DTYPES:
            raise RunConfigError(f"models.{name}.dtype={m.dtype}: use one of {', '.join(DTYPES)}")
        if m.optim.total_steps is not None:
            raise RunConfigError(f"models.{name}.optim.total_steps={m.optim.total_steps}: the run sets "
                                 "it (its optimizer steps); remove it")
    for name, c in cfg.calls.items():
        if c.model not in cfg.models:
            raise RunConfigError(f"calls.{name}.model={c.model}: no such model in models")
        if c.ep > 1:
            _validate_ep(cfg, name, c)
    if "all" in cfg.auto_calls and len(cfg.auto_calls) > 1:
        raise RunConfigError(f"auto_calls={cfg.auto_calls}: 'all' searches every call already; "
                             "give either calls: auto or calls.NAME: auto for some calls")
    if cfg.auto_calls and "all" not in cfg.auto_calls:
        from .models import DEFAULT_CALLS, REWARD_CALL
        known = set(DEFAULT_CALLS.get(cfg.algorithm, {})) | set(REWARD_CALL.get(cfg.algorithm, ()))
        for name in cfg.auto_calls:
            if name not in known:
                raise RunConfigError(f"calls.{name}: auto: {cfg.algorithm} runs no such call; its "
                                     f"calls are {', '.join(sorted(known))}")
    if cfg.reward.model is not None and cfg.reward.model not in cfg.models:
        raise RunConfigError(f"reward.model={cfg.reward.model}: no such model in models")
    if cfg.reward.model and cfg.reward.verifier:
        raise RunConfigError(f"reward: both model={cfg.reward.model} and verifier={cfg.reward.verifier} "
                             "are set, and one scores: keep one (reward.verifier=null or reward.model=null)")
    if cfg.data.safety_filter is not None and cfg.algorithm in ("sft", "ppo", "grpo"):
        raise RunConfigError(f"data.safety_filter={cfg.data.safety_filter}: {cfg.algorithm} reads no "
                             "preference pairs, so it would be ignored: remove it (it filters SafeRLHF "
                             "pairs for rm and dpo)")
    if cfg.algorithm in ("ppo", "grpo") and not (cfg.reward.model or cfg.reward.verifier):
        raise RunConfigError(f"{cfg.algorithm} needs reward.model or reward.verifier")
    if cfg.ppo.truncated not in ("score", "bootstrap"):
        raise RunConfigError(f"ppo.truncated={cfg.ppo.truncated}: use score or bootstrap")
    if cfg.algorithm == "ppo" and cfg.ppo.batch_size % cfg.ppo.minibatches:
        raise RunConfigError(f"ppo.batch_size={cfg.ppo.batch_size} is not divisible by "
                             f"ppo.minibatches={cfg.ppo.minibatches}")
    if cfg.algorithm in ("ppo", "grpo"):
        _validate_policy_gradient(cfg)
    _validate_async(cfg)
    if cfg.logging.stop_at_pass_rate is not None and not (
            cfg.data.eval and cfg.reward.verifier and cfg.logging.eval_every):
        raise RunConfigError(f"logging.stop_at_pass_rate={cfg.logging.stop_at_pass_rate} needs a "
                             "held-out pass rate: set data.eval, reward.verifier and logging.eval_every")
    check_trackers(cfg.logging, RunConfigError)
    if cfg.generation.engine not in GENERATION_ENGINES:
        raise RunConfigError(f"generation.engine={cfg.generation.engine}: use one of "
                             f"{', '.join(GENERATION_ENGINES)}")
    if cfg.data.train is None:
        raise RunConfigError("data.train is not set: give the training JSONL (data.train=PATH)")


def check_call_ep(name: str, c: CallSpec, *, dp: int | None = None, mcfg=None) -> None:
    """A call's expert parallelism against its dp (when known) and its model's experts (when its
    config is at hand): one line naming the call and the sizes otherwise."""
    if dp is not None and dp % c.ep:
        raise RunConfigError(f"calls.{name}: ep={c.ep} does not divide dp={dp}: expert ranks are "
                             f"carved from the call's data-parallel ranks; choose an ep that divides {dp}")
    if mcfg is None or c.ep == 1:
        return
    if not mcfg.num_experts:
        raise RunConfigError(f"calls.{name}: ep={c.ep} but model {c.model} is dense (num_experts=0): "
                             "expert parallelism needs a mixture-of-experts model; set ep=1")
    if mcfg.num_experts % c.ep:
        raise RunConfigError(f"calls.{name}: ep={c.ep} does not divide model {c.model}'s "
                             f"num_experts={mcfg.num_experts}: choose an ep that divides it")


def _validate_ep(cfg: RunConfig, name: str, c: CallSpec) -> None:
    """``calls.NAME.ep`` > 1 against the dp the config gives (explicitly, or by its ranks) and
    the call's model, where its shape is known without loading weights (``scratch:`` or a
    directory's config.json); the runtime and `meshrl plan` check the rest once dp is known."""
    import os

    from meshrl.parallel.layout import parse_ranks
    dp = c.dp
    if dp is None and c.ranks is not None:
        n = len(parse_ranks(c.ranks))
        dp = n // (c.tp * c.pp) if n % (c.tp * c.pp) == 0 else None
    spec = cfg.models[c.model]
    seen = set()
    while spec.init_from is not None and spec.init_from in cfg.models and spec.init_from not in seen:
        seen.add(spec.init_from)
        spec = cfg.models[spec.init_from]
    mcfg = None
    if spec.scratch is not None or (spec.path is not None
                                    and os.path.exists(os.path.join(spec.path, "config.json"))):
        from .models import load_model_config
        mcfg = load_model_config(spec, cfg.models)
    check_call_ep(name, c, dp=dp, mcfg=mcfg)


def _validate_policy_gradient(cfg: RunConfig) -> None:
    """What the RL loop's choices need of each other (value ranges: ``config_ranges``)."""
    from meshrl.engine.algorithms.advantages import GROUP_ESTIMATORS
    sec = cfg.algorithm
    S = getattr(cfg, sec)
    if sec == "ppo" and S.advantage != "gae":
        raise RunConfigError(f"ppo.advantage={S.advantage}: ppo's advantages come from its critic (gae); "
                             f"the critic-free estimators run as algorithm=grpo grpo.advantage={S.advantage}")
    if S.policy_loss == "dual_clip" and not S.clip_ratio_c > 1:
        raise RunConfigError(f"{sec}.clip_ratio_c={S.clip_ratio_c}: must exceed 1 (dual_clip caps a "
                             "negative advantage's loss at clip_ratio_c·|A|)")
    if S.overlong_buffer > cfg.generation.max_new_tokens:
        raise RunConfigError(f"{sec}.overlong_buffer={S.overlong_buffer} exceeds generation.max_new_tokens="
                             f"{cfg.generation.max_new_tokens}: the penalty ramps over the last tokens "
                             "before that limit, so use at most it")
    if S.kl_coef > 0 and "ref" not in cfg.models and REF_INF not in cfg.calls:
        raise RunConfigError(f"{sec}.kl_coef={S.kl_coef} needs a reference model: add models.ref "
                             f"(e.g. {{init_from: actor}}), or set {sec}.kl_coef=0")
    if sec == "grpo":
        if S.group_size < 2 and (S.advantage in GROUP_ESTIMATORS or S.dynamic_sampling):
            need = f"grpo.advantage={S.advantage}" if S.advantage in GROUP_ESTIMATORS else \
                "grpo.dynamic_sampling"
            raise RunConfigError(f"grpo.group_size={S.group_size}: {need} compares the samples of a "
                                 "prompt with each other, so it needs at least 2")


def _validate_async(cfg: RunConfig) -> None:
    """What asynchronous RL needs of the rest of the config (its layouts: `Executor`)."""
    A = cfg.async_
    if A.imp_cap is not None and A.imp_cap <= 1:
        raise RunConfigError(f"async.imp_cap={A.imp_cap}: must exceed 1 (a behaviour weight of 1 is "
                             "on policy; the cap bounds the weights above it)")
    if A.max_staleness == 0:
        return
    key = f"async.max_staleness={A.max_staleness}"
    if not (cfg.algorithm in ("ppo", "grpo") or (cfg.algorithm == "dpo" and cfg.dpo.rounds)):
        raise RunConfigError(f"{key}: {cfg.algorithm}"
                             f"{' offline (dpo.rounds=0)' if cfg.algorithm == 'dpo' else ''} samples "
                             "nothing while it trains; asynchronous generation is for ppo, grpo and "
                             "iterative dpo (dpo.rounds > 0): set async.max_staleness=0")
    if cfg.algorithm == "dpo" and (A.correction is not None or A.imp_cap is not None):
        raise RunConfigError("async.correction / async.imp_cap: dpo has no policy ratio to correct (its "
                             "loss compares pairs to the reference): remove them")
    S = getattr(cfg, cfg.algorithm)
    if A.sync_every > A.max_staleness:
        raise RunConfigError(f"async.sync_every={A.sync_every}: a batch sampled just before a weight "
                             f"move would be trained {A.sync_every} versions later, past {key}: use "
                             "sync_every <= max_staleness")
    if cfg.algorithm == "grpo" and S.dynamic_sampling:
        raise RunConfigError(f"grpo.dynamic_sampling with {key}: dynamic sampling decides each draw "
                             "from the last one's scores, so it runs synchronously: set "
                             "grpo.dynamic_sampling=false or async.max_staleness=0")
    if cfg.algorithm == "grpo" and S.advantage == "remax":
        raise RunConfigError(f"grpo.advantage=remax with {key}: ReMax's greedy baseline is sampled "
                             "with the policy being trained, so it runs synchronously: pick another "
                             "grpo.advantage or set async.max_staleness=0")
    if cfg.logging.save_every % A.sync_every:
        raise RunConfigError(f"logging.save_every={cfg.logging.save_every}: a checkpoint between two "
                             f"weight moves (async.sync_every={A.sync_every}) could not restore the "
                             "generation mesh's older weights: use a multiple of sync_every")


def to_yaml(cfg: RunConfig) -> str:
    doc = OmegaConf.to_container(OmegaConf.structured(cfg))
    doc["async"] = doc.pop("async_")
    return OmegaConf.to_yaml(doc)
