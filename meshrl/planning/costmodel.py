"""The cost model behind `meshrl plan`: bytes per GPU and seconds per model function call.

Everything here is arithmetic on a ModelConfig, a layout's (tp, pp, dp) and per-device rates; the
rates are read from benchmark results committed under ``benchmarks/`` (``benchmarks/rates.json``
says which file and row each comes from), never written into this code.

Memory per GPU (bytes; ``dt`` = parameter dtype bytes, P = this rank's parameter count):
  params      P·dt
  grads       P·4                      fp32 main-grad buffer (grad_buffer.py), even for bf16 params
  optimizer   P·12 / (dp if ZeRO-1)    fp32 master + Adam m and v (data_parallel.py)
  MoE (expert parallelism ep, carved from dp): a rank holds num_experts/ep experts of each MoE
              layer, each split by tp like an MLP; attention, norms, embeddings and the router stay
              replicated over dp. P counts all of it (total parameters, not active ones); under
              ZeRO-1 the dense part's optimizer state is split over dp, the experts' over the dp/ep
              ranks holding the same experts.
  activations (training, per token per layer, measured with saved-tensor hooks, see the tests)
              norms 2·(4h + 2·dt·h + 4) (fp32 input copy, normalised, output, fp32 rstd),
              attention dt·(3q + 2kv) + 4·heads (flash keeps q, k, v, out and an fp32
              logsumexp), MLP dt·4f, q/kv/f per tp rank; sequence parallel shards
              the norms by tp but the column-parallel inputs are gathered (+2·dt·h). With
              activation checkpointing only each layer's input (dt·h) is kept, plus one layer's
              full set during recompute. 1F1B keeps min(microbatches, pp − stage) in flight.
              A MoE layer's MLP term: k·(dt·(4f_e + h) + 4h + 40) + 4E + (4 − dt)·h (k routed
              copies of each token: expert activations, dispatched input, fp32 output, routes;
              fp32 router logits and input), measured like the dense terms. Qwen3's q/k norms
              add (4 + dt)·head_dim + 4 per query and KV head of the tp rank.
              Inference keeps one layer's transients: dt·(2h + 3f) per token (MoE: 3k·f_e + 2k·h).
  KV cache    batch per replica × (prompt + new) × layers per stage × 2 × kv heads per tp rank
              × head_dim × dt

Time (a FLOP is counted as in the committed throughput benchmark: 2·P per token forward, 6·P
training, 8·P with checkpointing; attention FLOPs are inside the measured rate; for MoE, P is the
active parameters: the dense part and k experts per MoE layer, the router included):
  train/forward microbatch = fixed + layers·per-layer + FLOPs/rate + TP collectives
  pipeline: (microbatches + pp − 1) × the slowest stage's microbatch (the 1F1B/GPipe bubble)
  decode step = max(weights + KV bytes / copy bandwidth, FLOPs/rate) + layers·per-layer-step,
                summed over pipeline stages (stepping one batch through the stages, or the fast
                engine's pp microbatches that each read a stage's weights: the same sum)
  TP: 2 ring all-reduces of tokens·h per layer forward, 4 training (6 with recompute), each
      latency + 2(tp−1)/tp·bytes/bandwidth; PP: one latency + tokens·h bytes per boundary;
  DP: reduce-scatter of fp32 grads + all-gather of params under ZeRO-1 (an all-reduce without),
      not overlapped with backward; optimizer: seconds per parameter from the benchmark. Expert
      gradients are reduced over their dp/ep ranks (the edp group), the dense ones over dp.
  EP: each MoE layer sends every token's hidden state to its k experts and back, two all-to-alls
      in the ep group (per tp rank) of k·tokens·h·dt bytes each per pass (forward; again in
      backward; again in the recompute); a rank sends 1/ep of it to each peer, over NVLink to the
      peers on its node and over its NIC to the others, both at once (`AllToAll`). A decoding
      step moves its batch's k·b·h·dt twice per MoE layer the same way.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

from meshrl.engine.model.config import ModelConfig
from meshrl.engine.model.llama import stage_layers
from meshrl.engine.model.meta import meta_specs
from meshrl.parallel.layout import ParallelLayout
from meshrl.parallel.realloc_plan import plan

from .rates import Rates

GB = 1e9
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ---- a call's shape ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CallShape:
    """A call as the functions below see it, apart from its workload: the model, its head, the
    parameter dtype's bytes (``dt``) and its layout's (tp, pp, dp)."""
    mcfg: ModelConfig = field(hash=False)  # a ModelConfig is unhashable; equality still compares it
    head: str = "lm"
    dt: int = 4
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def edp(self) -> int:
        """Ranks holding the same experts (their gradients are summed over them)."""
        return self.dp // self.ep


# ---- parameters per GPU ------------------------------------------------------------------------

def kv_heads_local(s: CallShape) -> int:
    """KV heads one tp rank holds: replicated (one each) when tp exceeds them."""
    kv = s.mcfg.num_key_value_heads
    return kv // s.tp if kv % s.tp == 0 else 1


def _attention_params(s: CallShape) -> int:
    """One rank's attention and the layer's two norms (and Qwen3's per-head q/k norms)."""
    cfg, tp = s.mcfg, s.tp
    h, hd = cfg.hidden_size, cfg.head_dim
    q = cfg.num_attention_heads * hd // tp
    kv = kv_heads_local(s) * hd
    n = h * q + 2 * h * kv + q * h + 2 * h + 2 * hd * cfg.qk_norm
    return n + (q + 2 * kv) * cfg.qkv_bias + h * cfg.o_bias


def expert_params(s: CallShape) -> int:
    """One expert's gate, up and down projections on one tp rank."""
    return 3 * s.mcfg.hidden_size * (s.mcfg.expert_intermediate_size // s.tp)


def layer_params(s: CallShape, layer: int | None = None) -> int:
    """Parameters one rank holds of decoder layer ``layer`` (None: a dense layer): a MoE layer
    holds the router (replicated) and num_experts/ep experts."""
    cfg, h = s.mcfg, s.mcfg.hidden_size
    if layer is not None and cfg.is_moe_layer(layer):
        return (_attention_params(s) + cfg.num_experts * h
                + cfg.num_experts // s.ep * expert_params(s))
    f = cfg.intermediate_size // s.tp
    return _attention_params(s) + 3 * h * f + (2 * f + h) * cfg.mlp_bias


def stage_layer_ids(s: CallShape, stage: int) -> range:
    """The layers pipeline stage ``stage`` holds (the model's own split)."""
    return stage_layers(s.mcfg.num_hidden_layers, s.pp, stage)


def stage_layer_count(s: CallShape, stage: int) -> int:
    return len(stage_layer_ids(s, stage))


def stage_moe_layers(s: CallShape, stage: int) -> int:
    """MoE layers on pipeline stage ``stage``."""
    return sum(map(s.mcfg.is_moe_layer, stage_layer_ids(s, stage))) if s.mcfg.is_moe else 0


def stage_expert_params(s: CallShape, stage: int) -> int:
    """The expert weights one rank of ``stage`` holds (the rest of `stage_params` is dense)."""
    return stage_moe_layers(s, stage) * s.mcfg.num_experts // s.ep * expert_params(s)


def stage_params(s: CallShape, stage: int) -> int:
    """Parameters one rank of pipeline stage ``stage`` holds (padded vocabulary included)."""
    cfg = s.mcfg
    h = cfg.hidden_size
    vocab_local = -(-cfg.vocab_size // s.tp) * h
    if cfg.is_moe:
        n = sum(layer_params(s, i) for i in stage_layer_ids(s, stage))
    else:
        n = stage_layer_count(s, stage) * layer_params(s)
    if stage == 0:
        n += vocab_local
    if stage == s.pp - 1:
        n += h
        if s.head == "value":
            n += h
        elif not (cfg.tie_word_embeddings and s.pp == 1):
            n += vocab_local
    return n


def stage_active_params(s: CallShape, stage: int) -> float:
    """Parameters one token's work touches per rank of ``stage``, the FLOPs' measure: the dense
    part and, per MoE layer, k experts (balanced routing gives each rank of the ep group k
    expert-token products per token it holds, whichever experts they are)."""
    k = s.mcfg.num_experts_per_tok
    return (stage_params(s, stage) - stage_expert_params(s, stage)
            + stage_moe_layers(s, stage) * k * expert_params(s))


def optimizer_params(s: CallShape, stage: int, zero1: bool) -> float:
    """Parameters whose fp32 master and Adam moments one rank keeps: under ZeRO-1 the dense ones
    split over dp, the experts over the dp/ep ranks that hold the same experts."""
    P = stage_params(s, stage)
    if not zero1:
        return P
    E = stage_expert_params(s, stage)
    return (P - E) / s.dp + E / s.edp


# ---- workload ----------------------------------------------------------------------------------

@dataclass
class Workload:
    sequences: int        # sampled sequences per step
    prompt_len: float     # tokens per prompt (mean)
    response_len: float   # tokens per response (mean)
    decode_steps: int     # decoding steps per batch
    updates: int          # optimizer steps per model per step (minibatches × epochs)
    epochs: int = 1
    extra_generated: int = 0  # responses generated but not trained on (ReMax's greedy baselines)

    @property
    def generated(self) -> int:
        return self.sequences + self.extra_generated

    @property
    def seq_len(self) -> float:
        return self.prompt_len + self.response_len

    @property
    def tokens(self) -> float:
        return self.sequences * self.seq_len


# Sequences per optimizer step of the supervised algorithms: a pair is two sequences.
SEQS_PER_EXAMPLE = {"sft": 1, "rm": 2, "dpo": 2}


def workload_of(cfg, prompt_len=None, response_len=None, decode_steps=None) -> Workload:
    """One step's work: PPO/GRPO sample responses and run minibatch updates; SFT, RM and DPO
    train once on a batch of data sequences (``data.max_len`` tokens each unless overridden;
    iterative DPO's pairs are sampled responses of up to ``generation.max_new_tokens``)."""
    new = cfg.generation.max_new_tokens
    prompt = float(prompt_len if prompt_len is not None else cfg.data.max_prompt_len)
    if cfg.algorithm in SEQS_PER_EXAMPLE:
        batch = getattr(cfg, cfg.algorithm).batch_size
        online = cfg.algorithm == "dpo" and cfg.dpo.rounds > 0  # pairs of sampled responses
        default = new if online else max(1, cfg.data.max_len - prompt)
        response = float(response_len if response_len is not None else default)
        return Workload(SEQS_PER_EXAMPLE[cfg.algorithm] * batch, prompt, response,
                        int(decode_steps or new), 1, 1)
    n = cfg.ppo.batch_size
    updates = cfg.ppo.minibatches * cfg.ppo.epochs
    extra = 0
    if cfg.algorithm == "grpo":
        n, updates = cfg.grpo.batch_size * cfg.grpo.group_size, cfg.grpo.minibatches * cfg.grpo.epochs
        extra = cfg.grpo.batch_size if cfg.grpo.advantage == "remax" else 0  # one greedy per prompt
    epochs = cfg.grpo.epochs if cfg.algorithm == "grpo" else cfg.ppo.epochs
    return Workload(n, prompt, float(response_len if response_len is not None else new),
                    int(decode_steps or new), updates, epochs, extra)


def online_round_workload(cfg, wl: Workload) -> Workload:
    """Iterative DPO's sampling before each round's steps: samples_per_prompt responses for each
    of prompts_per_round prompts, ``generation.max_new_tokens`` long at most."""
    d, new = cfg.dpo, cfg.generation.max_new_tokens
    return Workload(d.prompts_per_round * d.samples_per_prompt, wl.prompt_len, float(new),
                    wl.decode_steps, 1, 1)


# ---- memory per GPU ----------------------------------------------------------------------------

@dataclass
class Memory:
    params: float = 0.0
    grads: float = 0.0
    optim: float = 0.0
    activations: float = 0.0
    kv: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optim + self.activations + self.kv


def act_bytes_per_token_layer(s: CallShape, sp: bool, moe: bool = False) -> float:
    cfg, tp, dt = s.mcfg, s.tp, s.dt
    h = cfg.hidden_size
    q = cfg.num_attention_heads * cfg.head_dim // tp
    kv = kv_heads_local(s) * cfg.head_dim
    norms = 2 * (4 * h + 2 * dt * h + 4)
    if sp and tp > 1:
        norms = norms / tp + 2 * dt * h
    if moe:
        # per routed copy (k per token): the expert's activations and its dispatched input (dt),
        # its fp32 output kept for the weighted sum, the int64 routes and fp32 weights; per token
        # the fp32 router logits and, below fp32, the router's fp32 copy of the input in place
        # of the MLP's (dt) copy of it
        k = cfg.num_experts_per_tok
        mlp = (k * (dt * (4 * (cfg.expert_intermediate_size // tp) + h) + 4 * h + 40)
               + 4 * cfg.num_experts + (4 - dt) * h)
    else:
        mlp = dt * 4 * (cfg.intermediate_size // tp)
    # Qwen3's per-head q and k norms: an fp32 copy of each head, its normalised output, its rstd
    heads_normed = (cfg.num_attention_heads // tp + kv_heads_local(s)) * cfg.qk_norm
    qk = heads_normed * ((4 + dt) * cfg.head_dim + 4)
    return norms + qk + dt * (3 * q + 2 * kv) + 4 * cfg.num_attention_heads // tp + mlp


def train_activations(s: CallShape, stage, *, sp, ckpt, mb_tokens, microbatches) -> float:
    layers = stage_layer_count(s, stage)
    moe = stage_moe_layers(s, stage)
    per_layer = [act_bytes_per_token_layer(s, sp, m) for m in (False, True)]
    full = (layers - moe) * per_layer[0] + moe * per_layer[1]  # the stage's layers, per token
    if ckpt:
        per_mb = mb_tokens * layers * s.dt * s.mcfg.hidden_size / (s.tp if sp and s.tp > 1 else 1)
        one_layer = mb_tokens * max(per_layer[1] if moe else 0.0,
                                    per_layer[0] if layers > moe else 0.0)
    else:
        per_mb, one_layer = mb_tokens * full, 0.0
    return min(microbatches, s.pp - stage) * per_mb + one_layer


def forward_activations(s: CallShape, tokens) -> float:
    cfg, h = s.mcfg, s.mcfg.hidden_size
    dense = 2 * h + 3 * cfg.intermediate_size // s.tp
    if cfg.is_moe:
        k = cfg.num_experts_per_tok
        moe = 2 * h + 3 * k * (cfg.expert_intermediate_size // s.tp) + 2 * k * h
        dense = moe if len(cfg.moe_layers) == cfg.num_hidden_layers else max(dense, moe)
    return tokens * s.dt * dense


def kv_cache_bytes(s: CallShape, stage, *, batch, context) -> float:
    return (batch * context * stage_layer_count(s, stage) * 2 * kv_heads_local(s)
            * s.mcfg.head_dim * s.dt)


# ---- time ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    """One process group's ring: its size, bandwidth (bytes/s) and per-message latency."""
    size: int
    bw: float
    latency: float

    def all_reduce(self, nbytes: float) -> float:
        if self.size == 1:
            return 0.0
        return self.latency + 2 * (self.size - 1) / self.size * nbytes / self.bw

    def half(self, nbytes: float) -> float:
        """A reduce-scatter or an all-gather of ``nbytes`` (the full buffer size)."""
        if self.size == 1:
            return 0.0
        return self.latency + (self.size - 1) / self.size * nbytes / self.bw

    def p2p(self, nbytes: float) -> float:
        return 0.0 if self.size == 1 else self.latency + nbytes / self.bw


@dataclass(frozen=True)
class AllToAll:
    """The ep group's all-to-all: a rank sends 1/size of its buffer to each peer, ``intra_peers``
    of them on its node (NVLink) and ``inter_peers`` on others (its NIC), both links at once;
    the worst rank of the layout's groups."""
    size: int = 1
    intra_peers: int = 0
    inter_peers: int = 0
    intra_bw: float = 1.0
    inter_bw: float = 1.0
    latency: float = 0.0

    def seconds(self, nbytes: float) -> float:
        """One all-to-all of ``nbytes`` per rank (the whole buffer, its own share included)."""
        if self.size == 1:
            return 0.0
        share = nbytes / self.size
        return self.latency + max(self.intra_peers * share / self.intra_bw,
                                  self.inter_peers * share / self.inter_bw)

    def leaving(self, nbytes: float) -> float:
        """Bytes of ``nbytes`` that leave the rank: (size − 1)/size of them."""
        return nbytes * (self.size - 1) / self.size


@dataclass(frozen=True)
class Links:
    tp: Link
    pp: Link
    dp: Link
    ep: AllToAll = AllToAll()
    edp: Link | None = None  # the experts' gradient group (dp/ep ranks); None: dp's

    @property
    def expert_dp(self) -> Link:
        return self.edp if self.edp is not None else self.dp


def link_bandwidths(cluster, r: Rates) -> tuple[float, float]:
    """(intra-node, inter-node) bytes/s: the cluster's links, or the device's measured ones (CPU)."""
    if r.link_gbps is not None:
        return r.link_gbps * 1e9, r.link_gbps * 1e9
    return cluster.intra_node_gbps * 1e9 / 8, cluster.inter_node_gbps * 1e9 / 8


def group_links(layout: ParallelLayout, cluster, r: Rates) -> Links:
    """A group is as fast as its slowest hop: cross-node if any group of the axis spans nodes."""
    intra, inter = link_bandwidths(cluster, r)
    gpn, L = cluster.gpus_per_node, layout
    coords = [(t, d, p) for p in range(L.pp_size) for d in range(L.dp_size) for t in range(L.tp_size)]

    def link(groups):
        cross = any(len({x // gpn for x in g}) > 1 for g in groups)
        return Link(len(groups[0]), inter if cross else intra, r.latency_s)
    ep, edp = AllToAll(), None
    E = L.ep_size
    if E > 1:
        groups = [L.ep_ranks_of(t, j, p) for p in range(L.pp_size) for j in range(L.dp_size // E)
                  for t in range(L.tp_size)]
        worst = max(((sum(y // gpn == x // gpn for y in g) - 1, sum(y // gpn != x // gpn for y in g))
                     for g in groups for x in g), key=lambda n: max(n[0] / intra, n[1] / inter))
        ep = AllToAll(E, *worst, intra, inter, r.latency_s)
        edp = link([L.edp_ranks_of(t, e, p) for p in range(L.pp_size) for e in range(E)
                    for t in range(L.tp_size)])
    return Links(
        tp=link([L.tp_ranks_of(d, p) for t, d, p in coords if t == 0]),
        pp=link([L.pp_ranks_of(t, d) for t, d, p in coords if p == 0]),
        dp=link([L.dp_ranks_of(t, p) for t, d, p in coords if d == 0]), ep=ep, edp=edp)


@dataclass
class CallTime:
    seconds: float
    tokens: float          # tokens processed (generated tokens for generation)
    flops: float           # model FLOPs by the benchmark's convention
    gpus: int
    parts: dict = field(default_factory=dict)  # seconds by cause: compute, comm, bubble, overhead
    # the experts' all-to-alls (MoE, ep > 1) on the busiest rank, in all: seconds (also among
    # ``parts``, prefill's inside its own) and bytes that leave the rank
    a2a_seconds: float = 0.0
    a2a_bytes: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    @property
    def tflops_per_gpu(self) -> float:
        return self.flops / self.seconds / self.gpus / 1e12 if self.seconds > 0 else math.nan


def _stages(s: CallShape):
    return [(i, stage_params(s, i), stage_layer_count(s, i)) for i in range(s.pp)]


def a2a_passes(train: bool, ckpt: bool = False) -> int:
    """Times a microbatch crosses each MoE layer: forward, backward, and the recompute."""
    return (3 if ckpt else 2) if train else 1


def moe_a2a(s: CallShape, tokens: float, links: Links, *, passes: int = 1,
            stage: int | None = None) -> tuple[float, float]:
    """(seconds, bytes leaving the rank) of the experts' all-to-alls for ``tokens`` tokens on one
    rank of ``stage`` (None: the stage with the most MoE layers): per MoE layer and pass, the
    dispatch and the combine of k·tokens hidden states each. Zero for a dense model or ep 1."""
    if links.ep.size == 1 or not s.mcfg.is_moe:
        return 0.0, 0.0
    layers = (stage_moe_layers(s, stage) if stage is not None
              else max(stage_moe_layers(s, i) for i in range(s.pp)))
    nbytes = s.mcfg.num_experts_per_tok * tokens * s.mcfg.hidden_size * s.dt
    n = 2 * passes * layers
    return n * links.ep.seconds(nbytes), n * links.ep.leaving(nbytes)


def attention_span(seq_len: float, mb_tokens: float, dense_block: int) -> float:
    """Keys a token's attention reads, on average, in a packed microbatch of sequences of
    ``seq_len`` tokens: half its sequence under a causal kernel (``dense_block`` 0: the GPU's
    varlen kernels), else a whole dense block of whole sequences (the CPU path, one SDPA over
    blocks of at most ``dense_block`` tokens); a longer sequence runs alone."""
    if not dense_block:
        return seq_len / 2
    if seq_len > dense_block:
        return seq_len
    return min(mb_tokens, dense_block)


def attention_macs(mcfg: ModelConfig, tp: int, span: float) -> float:
    """Multiply-adds per token per layer of attention's scores and weighted sum (QKᵀ and AV) over
    ``span`` keys, on one rank of ``tp``: what the parameter count (P per token) leaves out."""
    return 2 * mcfg.num_attention_heads // tp * mcfg.head_dim * span


def _forward_pass(s: CallShape, tokens_rep, mb_tokens, r: Rates, links: Links,
                  *, train: bool, seq_len: float, ckpt: bool = False) -> tuple[float, dict]:
    """One pass over ``tokens_rep`` tokens per replica (sequences of ``seq_len`` tokens) in
    microbatches through the pipeline."""
    h, dt, pp = s.mcfg.hidden_size, s.dt, s.pp
    m = max(1, math.ceil(tokens_rep / mb_tokens))
    mbt = tokens_rep / m
    k, colls = (8 if ckpt else 6, 6 if ckpt else 4) if train else (2, 2)
    rate = (r.train_tflops if train else r.fwd_tflops) * 1e12
    fixed, per_layer = (r.train_mb_s, r.train_layer_s) if train else (r.fwd_mb_s, r.fwd_layer_s)
    attn = attention_macs(s.mcfg, s.tp, attention_span(seq_len, mbt, r.dense_attention_block))
    # elementwise work is not split by tp: every rank normalises all its tokens (sequence
    # parallelism would split it; priced as replicated)
    elem_per_layer = (r.train_elem_s if train else r.fwd_elem_s) * h * mbt
    worst, parts, a2a_bytes = 0.0, {}, 0.0
    for stage, _, layers in _stages(s):
        P = stage_active_params(s, stage)  # MoE: the k experts a token runs through
        comp = k * (P + layers * attn) * mbt / rate
        elem = layers * elem_per_layer
        comm = colls * layers * links.tp.all_reduce(mbt * h * dt)
        a2a, nbytes = moe_a2a(s, mbt, links, passes=a2a_passes(train, ckpt), stage=stage)
        over = fixed + layers * per_layer
        if comp + elem + comm + a2a + over > worst:
            worst = comp + elem + comm + a2a + over
            parts = {"compute": comp, "elementwise": elem, "tp_comm": comm, "overhead": over}
            if a2a:
                parts["ep_a2a"] = a2a
            a2a_bytes = nbytes
    p2p = (2 if train else 1) * links.pp.p2p(mbt * h * dt) if pp > 1 else 0.0
    slots = m + pp - 1
    out = {k2: v * m for k2, v in parts.items()}
    out["pp_comm"] = p2p * slots
    out["bubble"] = worst * (pp - 1)
    out["_a2a_bytes"] = a2a_bytes * m
    return worst * slots + p2p * slots, out


def _split_a2a(parts: dict) -> tuple[dict, float]:
    """``_forward_pass``'s parts without its all-to-all bytes, and those bytes."""
    parts = dict(parts)
    return parts, parts.pop("_a2a_bytes", 0.0)


def active_params(s: CallShape) -> int:
    """The whole model's parameters one token runs through (MoE: k experts per MoE layer)."""
    return s.mcfg.num_params(value_head=s.head == "value", active=True)


def forward_time(s: CallShape, *, tokens, mb_tokens, seq_len, r: Rates, links: Links) -> CallTime:
    secs, parts = _forward_pass(s, tokens / s.dp, mb_tokens, r, links, train=False, seq_len=seq_len)
    parts, a2a = _split_a2a(parts)
    return CallTime(secs, tokens, 2 * active_params(s) * tokens, s.gpus, parts,
                    parts.get("ep_a2a", 0.0), a2a)


def _grad_sync(s: CallShape, stage: int, zero1: bool, links: Links) -> float:
    """One optimizer step's gradient (and ZeRO-1 parameter) traffic on a rank of ``stage``: the
    dense part over dp, the experts over the dp/ep ranks that hold the same experts."""
    E = stage_expert_params(s, stage)
    out = 0.0
    for P, link in ((stage_params(s, stage) - E, links.dp), (E, links.expert_dp)):
        if P:
            out += (link.half(4 * P) + link.half(s.dt * P)) if zero1 else link.all_reduce(4 * P)
    return out


def train_time(s: CallShape, *, tokens, mb_tokens, seq_len, updates, zero1, ckpt,
               r: Rates, links: Links) -> CallTime:
    """``updates`` optimizer steps (minibatches × epochs) over ``tokens`` per epoch in all."""
    per_update = tokens / updates
    secs, parts = _forward_pass(s, per_update / s.dp, mb_tokens, r, links, train=True, ckpt=ckpt,
                                seq_len=seq_len)
    parts, a2a = _split_a2a(parts)
    sync, opt = max(((_grad_sync(s, i, zero1, links),
                      r.opt_fixed_s + r.opt_s_per_param * optimizer_params(s, i, zero1))
                     for i in range(s.pp)), key=sum)
    parts = {k: v * updates for k, v in parts.items()}
    parts.update(dp_comm=sync * updates, optimizer=opt * updates)
    # model FLOPs (6·P·T), as the benchmark counts them: recomputation is cost, not work
    return CallTime((secs + sync + opt) * updates, tokens, 6 * active_params(s) * tokens, s.gpus,
                    parts, parts.get("ep_a2a", 0.0), a2a * updates)


def experts_read(s: CallShape, tokens: float) -> float:
    """Experts of one MoE layer a rank reads in a decoding step when the ep group's ``tokens``
    tokens each pick k of E experts, uniformly: its E/ep experts, each hit with probability
    1 − (1 − k/E)^tokens."""
    E, k = s.mcfg.num_experts, s.mcfg.num_experts_per_tok
    return E / s.ep * (1 - (1 - k / E) ** tokens)


def generate_time(s: CallShape, *, prompts, prompt_len, new_tokens, decode_steps,
                  batch_size, r: Rates, links: Links) -> CallTime:
    """``prompts`` sequences in all; each replica decodes its share in batches of ``batch_size``."""
    s = dataclasses.replace(s, head="lm")  # sampling runs the LM head
    dt, pp = s.dt, s.pp
    per_rep = math.ceil(prompts / s.dp)
    n_batches = max(1, math.ceil(per_rep / batch_size))
    b = per_rep / n_batches
    ctx = prompt_len + decode_steps / 2  # mean context over the decoding steps
    h = s.mcfg.hidden_size
    step = compute = over = comm = a2a = 0.0
    for stage, P, layers in _stages(s):
        # weights read: the dense part, and the experts the ep group's batch routes to
        E = stage_expert_params(s, stage)
        read = P - E + (stage_moe_layers(s, stage) * experts_read(s, b * s.ep) * expert_params(s)
                        if E else 0)
        nbytes = read * dt + kv_cache_bytes(s, stage, batch=b, context=ctx)
        c = max(nbytes / (r.copy_tbps * 1e12),
                2 * stage_active_params(s, stage) * b / (r.fwd_tflops * 1e12))
        o = layers * r.decode_layer_s
        t = 2 * layers * links.tp.all_reduce(b * h * dt)
        x = moe_a2a(s, b, links, stage=stage)[0]  # stepping the batch through every stage
        compute, over, comm, a2a = compute + c, over + o, comm + t, a2a + x
    p2p = (pp - 1) * links.pp.p2p(b * h * dt)
    host = r.decode_step_s + b * r.decode_seq_s  # every tp rank samples its replica's batch
    step = compute + over + comm + a2a + p2p + host
    prefill, pre_parts = _forward_pass(s, b * prompt_len, b * prompt_len, r, links, train=False,
                                       seq_len=prompt_len)
    secs = n_batches * (prefill + decode_steps * step)
    parts = {"decode_memory": n_batches * decode_steps * compute,
             "overhead": n_batches * decode_steps * (over + host),
             "tp_comm": n_batches * decode_steps * comm, "pp_comm": n_batches * decode_steps * p2p,
             "prefill": n_batches * prefill}
    if a2a:
        parts["ep_a2a"] = n_batches * decode_steps * a2a
    flops = 2 * active_params(s) * prompts * (prompt_len + new_tokens)
    # the all-to-alls: decoding's and prefill's; bytes on a rank of the busiest stage
    a2a_s = n_batches * (decode_steps * a2a + pre_parts.get("ep_a2a", 0.0))
    a2a_bytes = n_batches * (decode_steps * moe_a2a(s, b, links)[1] + _split_a2a(pre_parts)[1])
    return CallTime(secs, prompts * new_tokens, flops, s.gpus, parts, a2a_s, a2a_bytes)


# ---- reallocation -----------------------------------------------------------------------------

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _stage_of(layer: int, num_layers: int, pp: int) -> int:
    return next(s for s in range(pp) if layer < (s + 1) * num_layers // pp)


def _coord(layout: ParallelLayout, rank: int) -> tuple[int, int, int]:
    """(tp, pp, ep) of a rank: the ranks of one coordinate hold the same shards."""
    c = layout.coord_of(rank)
    return c.tp, c.pp, c.ep


def _meta_specs(mcfg, head, layout: ParallelLayout, keep: set[int], cache: dict | None = None) -> dict:
    """{rank: specs} of the representative layers in ``keep`` (and the embeddings, final norm and
    head), once per (tp, pp, ep) coordinate (dp replicas holding the same experts hold the same
    shards; ``cache`` keeps them across calls). Decoder layers are alike but for their index (and
    whether they route to experts), so a coordinate's specs come from a meta-built stage of one
    layer per stage, its layer renamed to each kept index of the stage (the tests compare this
    with planning every layer of full stages); a model that mixes dense and MoE layers builds
    one such stage of each kind."""
    cache = {} if cache is None else cache
    L, pp = mcfg.num_hidden_layers, layout.pp_size
    mixed = mcfg.is_moe and 0 < len(mcfg.moe_layers) < L
    key = (id(mcfg), head, layout.tp_size, pp, layout.ep_size)
    if key not in cache:  # {kind (MoE layer or not): {(tp, pp, ep) coordinate: specs}}
        kinds = [mcfg.is_moe] + ([False] if mixed else [])
        cache[key] = {}
        for moe in kinds:
            small = dataclasses.replace(mcfg, num_hidden_layers=pp)
            if mcfg.is_moe:  # every layer of the small stage of this kind
                small = dataclasses.replace(small, decoder_sparse_step=1,
                                            mlp_only_layers=() if moe else tuple(range(pp)))
            cache[key][moe] = {_coord(layout, r): specs
                               for r, specs in meta_specs(small, head, layout).items()}
    built = {}
    for coord, specs in cache[key][mcfg.is_moe].items():
        mine = {}
        for moe, kind_specs in cache[key].items():
            for n, spec in kind_specs[coord].items():
                m = _LAYER.match(n)
                if m is None:
                    mine[n] = spec
                    continue
                rest = n[m.end():]
                for i in stage_layers(L, pp, coord[1]):
                    if i in keep and mcfg.is_moe_layer(i) == moe:
                        name = f"model.layers.{i}.{rest}"
                        mine[name] = dataclasses.replace(spec, name=name)
        built[coord] = mine
    return {r: built[_coord(layout, r)] for r in layout.ranks}


def _representatives(mcfg: ModelConfig, src: ParallelLayout, dst: ParallelLayout) -> dict[int, int]:
    """{representative layer: layers it stands for}: layers whose (source stage, destination
    stage, dense or MoE) agree move alike."""
    L = mcfg.num_hidden_layers
    classes: dict[tuple, list[int]] = {}
    for i in range(L):
        classes.setdefault((_stage_of(i, L, src.pp_size), _stage_of(i, L, dst.pp_size),
                            mcfg.is_moe_layer(i)), []).append(i)
    return {v[0]: len(v) for v in classes.values()}


def realloc_cost(mcfg: ModelConfig, head: str, dtype, src: ParallelLayout, dst: ParallelLayout, *,
                 gpus_per_node: int, intra_bw: float, inter_bw: float, local_bw: float,
                 latency: float = 0.0, spec_cache: dict | None = None) -> dict:
    """Bytes and seconds of moving a model from ``src`` to ``dst`` by the real planner.

    Layers whose (source stage, destination stage) agree move alike, so one representative per
    such class is planned and its bytes counted once per layer of the class; the tests check this
    against planning every layer. Time: each rank sends and receives at once over NVLink and its
    NIC (full duplex, the two link types concurrently), so the move takes the slowest rank's
    max(intra bytes / intra bandwidth, cross-node bytes / inter bandwidth) plus one message latency
    per peer, then its local copies at the measured local-copy bandwidth.
    """
    weight = _representatives(mcfg, src, dst)
    p = plan(src, dst, _meta_specs(mcfg, head, src, set(weight), spec_cache),
             _meta_specs(mcfg, head, dst, set(weight), spec_cache), node_of=lambda r: r // gpus_per_node,
             dtype=dtype)
    ranks = sorted(set(src.ranks) | set(dst.ranks))
    acc = {k: dict.fromkeys(ranks, 0.0) for k in ("intra_out", "intra_in", "inter_out", "inter_in",
                                                    "local", "sent")}
    peers = {r: set() for r in ranks}
    for t in p.transfers:
        m = _LAYER.match(t.name)
        b = t.nbytes * (weight[int(m.group(1))] if m else 1)
        if t.local:
            acc["local"][t.dst] += b
            continue
        link = "inter" if t.src // gpus_per_node != t.dst // gpus_per_node else "intra"
        acc[link + "_out"][t.src] += b
        acc[link + "_in"][t.dst] += b
        acc["sent"][t.src] += b
        peers[t.src].add(t.dst)
        peers[t.dst].add(t.src)
    intra = {r: max(acc["intra_out"][r], acc["intra_in"][r]) for r in ranks}
    inter = {r: max(acc["inter_out"][r], acc["inter_in"][r]) for r in ranks}
    link_s = max(max(intra[r] / intra_bw, inter[r] / inter_bw) + latency * len(peers[r])
                 for r in ranks)
    local_s = max(acc["local"].values()) / local_bw
    senders = [b for b in acc["sent"].values() if b]
    return {"remote_bytes": sum(acc["intra_in"].values()) + sum(acc["inter_in"].values()),
            "cross_node_bytes": sum(acc["inter_in"].values()), "local_bytes": sum(acc["local"].values()),
            "sender_max_bytes": max(senders, default=0.0), "sender_min_bytes": min(senders, default=0.0),
            "intra_max_bytes": max(intra.values()), "inter_max_bytes": max(inter.values()),
            "intra_seconds": max(intra.values()) / intra_bw,
            "inter_seconds": max(inter.values()) / inter_bw,
            "local_max_bytes": max(acc["local"].values()), "link_seconds": link_s,
            "local_seconds": local_s, "seconds": link_s + local_s, "layers_planned": len(weight)}


def realloc_floor_seconds(mcfg: ModelConfig, head: str, dtype, src: ParallelLayout, dst: ParallelLayout,
                          *, gpus_per_node: int, inter_bw: float, spec_cache: dict | None = None) -> float:
    """A lower bound of `realloc_cost`'s seconds, without planning: what some destination rank
    must receive across nodes — the parts of its shards that no source rank on its own node holds
    (the planner takes a region from the destination's node whenever a rank there holds it), over
    the inter-node bandwidth. Shards split one dimension, and a tensor's source and destination
    split the same one, so each is an interval test."""
    weight = _representatives(mcfg, src, dst)
    src_specs = _meta_specs(mcfg, head, src, set(weight), spec_cache)
    dst_specs = _meta_specs(mcfg, head, dst, set(weight), spec_cache)
    item = torch.empty((), dtype=dtype).element_size()
    held: dict[tuple[int, str], list[tuple[int, int]]] = {}  # (node, name) -> intervals held there
    for r, specs in src_specs.items():
        node = r // gpus_per_node
        for name, sp in specs.items():
            held.setdefault((node, name), []).append(
                (0, 1) if sp.dim is None else (sp.start, sp.valid_stop))
    worst = 0.0
    for d, specs in dst_specs.items():
        node, total = d // gpus_per_node, 0.0
        for name, sp in specs.items():
            lo, hi = (0, 1) if sp.dim is None else (sp.start, sp.valid_stop)
            if hi <= lo:
                continue
            covered = _covered(lo, hi, held.get((node, name), ()))
            if covered < hi - lo:
                m = _LAYER.match(name)
                numel = math.prod(sp.full_shape) * (1 if sp.dim is None else 1 / sp.full_shape[sp.dim])
                total += (hi - lo - covered) * numel * item * (weight[int(m.group(1))] if m else 1)
        worst = max(worst, total)
    return worst / inter_bw


def _covered(lo: int, hi: int, intervals) -> int:
    """How much of [lo, hi) the union of ``intervals`` covers."""
    out, reach = 0, lo
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, hi)
        if b > a:
            out += b - a
            reach = b
    return out
