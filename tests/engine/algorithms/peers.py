"""Peers' RL math as test oracles: verl 0.9.1, TRL 1.16.0, OpenRLHF 0.11.2 and AReaL 1.0.4, installed
by ``make install`` with ``pip install --no-deps`` (their trees pull ray, deepspeed, vllm, accelerate...).

How each peer is reached, and why this way (the least patching of *their* code):

- verl: ``verl/__init__.py`` imports ``ray`` and ``verl.utils/__init__`` imports tokenizer and config
  machinery, none of which ``trainer/ppo/core_algos.py`` uses. So the packages on the way
  (``verl``, ``verl.utils``, ``verl.trainer``, ``verl.trainer.ppo``, ``verl.workers``,
  ``verl.plugin``) are entered as *shells*: module objects whose ``__path__`` is the installed
  folder, so Python finds the real submodule files without running the packages' ``__init__``.
  The real files imported: ``core_algos``, ``utils/torch_functional`` (masked_whiten & co),
  ``utils/groupwise``, ``utils/import_utils``, ``utils/device``, ``plugin/platform``. Stubbed,
  with what core_algos reads of them: ``tensordict`` (a ``TensorDict`` class only named in an
  annotation), ``verl.trainer.config.AlgoConfig`` and ``verl.workers.config.ActorConfig`` (config
  dataclasses; core_algos only type-checks them with isinstance, so a stand-in class with the
  attributes the loss reads — clip_ratio*, ``.get``, global_batch_info — is what it gets). The
  rollout correction (``trainer/ppo/rollout_corr_helper.py``, truncated IS weights) is real too;
  ``verl.protocol.DataProto``, ``RolloutCorrectionConfig`` and ``PolicyLossConfig`` it imports are
  stand-in classes (read only by the functions that wrap the weights into a batch, which no test
  calls).
- OpenRLHF: the same shells for ``openrlhf``, ``openrlhf.models``, ``openrlhf.utils``,
  ``openrlhf.trainer``, ``openrlhf.trainer.ppo_utils``, ``openrlhf.trainer.ray``. Real files:
  ``models/loss.py`` (PolicyLoss, ValueLoss), ``models/utils.py`` (compute_approx_kl,
  compute_reward), ``trainer/ppo_utils/experience_maker.py`` (``compute_advantages_and_returns``
  called unbound on a stand-in ``self``), ``length_penalty.py``, ``experience.py``,
  ``utils/utils.py``, ``utils/logging_utils.py``, ``utils/seqlen_balancing.py``. Stubbed: ``ray``
  and ``deepspeed`` (imported at module level, used only by code we do not call) and
  ``openrlhf.trainer.ray.launcher.RayActorGroup`` (an annotation). ``torch.compile`` is an identity
  while ``models/utils.py`` loads (it only decorates ``compute_entropy``, which no test calls).
- TRL: its GRPO loss lives only inside ``GRPOTrainer._compute_loss`` (a method of a trainer that
  needs accelerate, datasets, a model...). The method's *source* is taken from the installed
  ``trl/trainer/grpo_trainer.py`` with ``ast`` and compiled as a plain function, with
  ``nanmin``/``nanmax``/``nanstd`` taken the same way from ``trl/trainer/utils.py``; it runs on a
  stand-in ``self`` whose ``_get_per_token_logps_and_entropies`` returns the test's log-probs.
  Nothing of TRL is rewritten: if a release renames what the method reads, it fails loudly.
- AReaL: its losses (``areal/utils/functional/functional.py``) import ``areal.api.cli_args``, which
  imports uvloop, hydra and most of AReaL. The packages on the way (``areal``, ``areal.api``,
  ``areal.utils``, ``areal.utils.functional``) are shells; ``areal.api.cli_args`` is a module
  holding only the real ``RejectionSamplingConfig`` (its class, validation included, compiled with
  ``ast`` from the installed ``cli_args.py``) and ``areal.utils.data`` one holding a stand-in
  ``KLEstimator`` (read only by the KL metrics of the rejection, never by the ratio one).

Every stub lives in ``sys.modules`` only while the peers are imported and is removed right after
(a ``deepspeed`` or ``ray`` module left behind would make transformers believe they are
installed); the imported peer modules keep their own references.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

PINS = {"verl": "0.9.1", "trl": "1.16.0", "openrlhf": "0.11.2", "areal": "1.0.4"}
# `make install` puts the peers here, not in site-packages (see the Makefile); last on the path, so
# nothing of theirs shadows a module of this environment
PEERS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "build", "peers")
if os.path.isdir(PEERS_DIR) and os.path.abspath(PEERS_DIR) not in sys.path:
    sys.path.append(os.path.abspath(PEERS_DIR))
_STUB_ROOTS = ("verl", "openrlhf", "areal", "ray", "deepspeed", "tensordict")


def _require(name: str) -> str:
    """The installed package's folder; a missing or differently pinned peer fails, never skips."""
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = None
    spec = importlib.util.find_spec(name) if version else None
    if version != PINS[name] or spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"test oracle {name}=={PINS[name]} is not installed (found {version}); run `make install` "
            f"(it installs the peers with `pip install --no-deps`)")
    return list(spec.submodule_search_locations)[0]


def _shell(name: str, path: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = [path]
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    mod.__spec__.submodule_search_locations = [path]
    return mod


def _stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    return mod


class _Config:
    """verl's config objects as core_algos reads them: attributes plus DictConfig's ``.get``."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def get(self, key, default=None):
        return self.__dict__.get(key, default)


class AlgoConfig(_Config):
    pass


class ActorConfig(_Config):
    pass


def _remove_stubs(before: set[str]) -> None:
    for name in list(sys.modules):
        if name not in before and name.split(".")[0] in _STUB_ROOTS:
            del sys.modules[name]


@functools.lru_cache(maxsize=None)
def verl() -> types.SimpleNamespace:
    """verl's core_algos (``.core_algos``), torch_functional (``.F``) and rollout_corr_helper
    (``.rollout_corr``)."""
    root = _require("verl")
    before = set(sys.modules)
    try:
        for sub in ("", "utils", "trainer", "trainer/ppo", "workers", "plugin"):
            name = "verl" + ("." + sub.replace("/", ".") if sub else "")
            sys.modules[name] = _shell(name, os.path.join(root, sub))
        sys.modules["tensordict"] = _stub("tensordict", TensorDict=type("TensorDict", (), {}))
        sys.modules["verl.trainer.config"] = _stub("verl.trainer.config", AlgoConfig=AlgoConfig)
        sys.modules["verl.workers.config"] = _stub("verl.workers.config", ActorConfig=ActorConfig)
        sys.modules["verl.protocol"] = _stub("verl.protocol", DataProto=type("DataProto", (), {}))
        sys.modules["verl.trainer.config.algorithm"] = _stub(
            "verl.trainer.config.algorithm", RolloutCorrectionConfig=type("RolloutCorrectionConfig", (), {}))
        sys.modules["verl.workers.config.actor"] = _stub(
            "verl.workers.config.actor", PolicyLossConfig=type("PolicyLossConfig", (), {}))
        groupwise = importlib.import_module("verl.utils.groupwise")
        sys.modules["verl.utils"].as_torch_index = groupwise.as_torch_index
        sys.modules["verl.utils"].group_mean_std = groupwise.group_mean_std
        core_algos = importlib.import_module("verl.trainer.ppo.core_algos")
        tf = importlib.import_module("verl.utils.torch_functional")
        rollout_corr = importlib.import_module("verl.trainer.ppo.rollout_corr_helper")
    finally:
        _remove_stubs(before)
    return types.SimpleNamespace(core_algos=core_algos, F=tf, rollout_corr=rollout_corr)


def verl_actor_config(*, clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0,
                      batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """An ``ActorConfig`` stand-in with the fields verl's policy losses read."""
    return ActorConfig(clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
                       clip_ratio_c=clip_ratio_c,
                       global_batch_info=dict(dp_size=1, batch_num_tokens=batch_num_tokens,
                                              global_batch_size=global_batch_size,
                                              loss_scale_factor=loss_scale_factor))


@functools.lru_cache(maxsize=None)
def openrlhf() -> types.SimpleNamespace:
    """OpenRLHF's models.loss (``.loss``), models.utils (``.utils``) and the experience maker
    (``.experience_maker``)."""
    root = _require("openrlhf")
    before = set(sys.modules)
    try:
        for sub in ("", "models", "utils", "trainer", "trainer/ppo_utils", "trainer/ray"):
            name = "openrlhf" + ("." + sub.replace("/", ".") if sub else "")
            sys.modules[name] = _shell(name, os.path.join(root, sub))
        sys.modules["ray"] = _stub("ray")
        sys.modules["deepspeed"] = _stub("deepspeed")
        sys.modules["openrlhf.trainer.ray.launcher"] = _stub(
            "openrlhf.trainer.ray.launcher", RayActorGroup=type("RayActorGroup", (), {}))
        # models/utils.py decorates compute_entropy (which no test calls) with @torch.compile, whose
        # first use imports dynamo and inductor (~4 s here): it is an identity while it loads.
        compile_, torch.compile = torch.compile, lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
        try:
            utils = importlib.import_module("openrlhf.models.utils")
        finally:
            torch.compile = compile_
        loss = importlib.import_module("openrlhf.models.loss")
        em = importlib.import_module("openrlhf.trainer.ppo_utils.experience_maker")
    finally:
        _remove_stubs(before)
    return types.SimpleNamespace(loss=loss, utils=utils, experience_maker=em)


def openrlhf_advantages(experiences: list, *, estimator: str, n_samples_per_prompt: int,
                        kl_coef: float = 0.0, gamma: float = 1.0, lambd: float = 1.0) -> list:
    """Runs ``RemoteExperienceMaker.compute_advantages_and_returns`` (the real method, unbound) on
    ``experiences``: objects with ``rewards`` [b], ``index`` (each sample's position in the
    prompt-grouped batch), ``kl`` [b, T], ``action_mask`` [b, T], ``values`` [b, T] (gae), ``info``.
    Returns them with ``advantages`` and ``returns`` set."""
    em = openrlhf().experience_maker.RemoteExperienceMaker
    args = types.SimpleNamespace(
        rollout=types.SimpleNamespace(n_samples_per_prompt=n_samples_per_prompt, max_new_tokens=None),
        reward=types.SimpleNamespace(clip_range=None, overlong_buffer_len=None,
                                     stop_properly_penalty_coef=None),
        algo=types.SimpleNamespace(advantage=types.SimpleNamespace(estimator=estimator, gamma=gamma,
                                                                   lambd=lambd, no_std_norm=False)))
    self = types.SimpleNamespace(strategy=types.SimpleNamespace(args=args), advantage_estimator=estimator,
                                 kl_ctl=types.SimpleNamespace(value=kl_coef))
    self.get_advantages_and_returns = types.MethodType(em.get_advantages_and_returns, self)
    self.get_cumulative_returns = types.MethodType(em.get_cumulative_returns, self)
    return em.compute_advantages_and_returns(self, experiences)


@dataclass
class OpenRLHFExperience:
    rewards: torch.Tensor
    index: list
    kl: torch.Tensor
    action_mask: torch.Tensor
    values: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    advantages: Any = None
    returns: Any = None


# --- TRL ----------------------------------------------------------------------------------------

def _functions_from(path: str, names: dict[str, str | None], namespace: dict) -> dict:
    """Compiles the named top-level functions (``None``) or methods (class name) of ``path``
    into ``namespace`` as plain functions, from the installed source, unchanged."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and names.get(node.name, "") is None:
            found[node.name] = node
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and names.get(item.name) == node.name:
                    found[item.name] = item
    missing = set(names) - set(found)
    if missing:
        raise RuntimeError(f"{path} no longer defines {sorted(missing)}: the TRL oracle needs updating")
    for fn in found.values():
        fn.decorator_list = []
    module = ast.Module(body=list(found.values()), type_ignores=[])
    exec(compile(module, path, "exec"), namespace)
    return {name: namespace[name] for name in names}


@functools.lru_cache(maxsize=None)
def trl() -> types.SimpleNamespace:
    """TRL's ``GRPOTrainer._compute_loss`` (``.compute_loss``) and ``nanstd`` (``.nanstd``)."""
    root = _require("trl")
    ns: dict = {"torch": torch}
    _functions_from(os.path.join(root, "trainer", "utils.py"),
                    {"nanmin": None, "nanmax": None, "nanstd": None}, ns)
    _functions_from(os.path.join(root, "trainer", "grpo_trainer.py"), {"_compute_loss": "GRPOTrainer"}, ns)
    return types.SimpleNamespace(compute_loss=ns["_compute_loss"], nanstd=ns["nanstd"])


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, *, loss_type: str, epsilon_low: float = 0.2,
                  epsilon_high: float = 0.2, importance_sampling_level: str = "token",
                  beta: float = 0.0, ref_logp: torch.Tensor | None = None,
                  max_completion_length: int | None = None,
                  num_items_in_batch: float | None = None) -> tuple[torch.Tensor, dict]:
    """TRL's GRPO loss on padded [B, T] log-probs, on one process with no gradient accumulation
    (so its normalisers are this batch's: B sequences, ``num_items_in_batch`` tokens for dapo)."""
    B, T = logp.shape
    args = types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
    self = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level, beta=beta, loss_type=loss_type,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, args=args, use_vllm=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=_Accelerator(), max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    self._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old_logp}
    if ref_logp is not None:
        inputs["ref_per_token_logps"] = ref_logp
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = torch.tensor(float(num_items_in_batch))
    loss = trl().compute_loss(self, None, inputs)
    return loss, dict(self._metrics["train"])


# --- AReaL --------------------------------------------------------------------------------------

def _classes_from(path: str, names: list[str], namespace: dict) -> dict:
    """Compiles the named top-level classes of ``path``, decorators kept, into ``namespace``."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    found = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name in names]
    if len(found) != len(names):
        raise RuntimeError(f"{path} no longer defines all of {names}: the oracle needs updating")
    exec(compile(ast.Module(body=found, type_ignores=[]), path, "exec"), namespace)
    return {name: namespace[name] for name in names}


@functools.lru_cache(maxsize=None)
def areal() -> types.SimpleNamespace:
    """AReaL's utils.functional.functional (``.functional``: ppo_actor_loss_fn) and its
    ``RejectionSamplingConfig``."""
    root = _require("areal")
    before = set(sys.modules)
    try:
        for sub in ("", "api", "utils", "utils/functional"):
            name = "areal" + ("." + sub.replace("/", ".") if sub else "")
            sys.modules[name] = _shell(name, os.path.join(root, sub))
        ns = _classes_from(os.path.join(root, "api", "cli_args.py"), ["RejectionSamplingConfig"],
                           {"dataclass": dataclass, "field": field})
        sys.modules["areal.api.cli_args"] = _stub("areal.api.cli_args", **ns)
        sys.modules["areal.utils.data"] = _stub("areal.utils.data", KLEstimator=type("KLEstimator", (), {}))
        functional = importlib.import_module("areal.utils.functional.functional")
    finally:
        _remove_stubs(before)
    return types.SimpleNamespace(functional=functional, **ns)


# --- packed <-> padded --------------------------------------------------------------------------

def unpad(padded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [N], the masked positions in row-major order (the packed order)."""
    return padded[mask.bool()]


def ragged(seed: int, *, groups: int = 4, k: int = 4, max_len: int = 12):
    """A random batch of ``groups``·k responses with action counts in [1, max_len] (a one-token and
    a ``max_len`` response always among them): (generator, cu_seqlens int32 [B+1], lengths [B])."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (groups * k,), generator=g)
    lens[0], lens[-1] = 1, max_len
    cu = torch.zeros(groups * k + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    return g, cu, lens


def spread(packed: torch.Tensor, cu_seqlens: torch.Tensor, g: torch.Generator, *, holes: int = 0,
           fill: float = 0.0):
    """[N] packed actions -> ([B, T] padded, [B, T] 0/1 mask). With ``holes``, each response gets up
    to that many non-action positions (mask 0, value ``fill``) before its last action: verl's
    multi-turn observation tokens, which its GAE and REINFORCE++ skip."""
    rows = []
    for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        n = e - s
        h = int(torch.randint(0, holes + 1, (), generator=g)) if n > 1 else 0
        keep = torch.randperm(n + h - 1, generator=g)[:n - 1].sort().values.tolist() + [n + h - 1]
        row = packed.new_full((n + h,), fill)
        row[keep] = packed[s:e]
        m = torch.zeros(n + h, dtype=torch.long)
        m[keep] = 1
        rows.append((row, m))
    T = max(r.numel() for r, _ in rows)
    out = packed.new_full((len(rows), T), fill)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (r, m) in enumerate(rows):
        out[b, :r.numel()], mask[b, :m.numel()] = r, m
    return out, mask
