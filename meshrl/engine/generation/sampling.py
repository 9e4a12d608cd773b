"""Token sampling whose randomness does not depend on the parallel layout.

The noise for sequence i at decoding step t and vocabulary entry v is a hash of (seed, i, t, v), and
a token is drawn by Gumbel-max over the filtered logits: any tp/pp/dp split that gives sequence i the
same global index draws the same token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

_MASK32 = 0xFFFFFFFF


@dataclass(kw_only=True)
class SamplingParams:
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    eos_ids: list[int] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be at least 1")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0 (or use greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must not be negative (0 turns the filter off)")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens={self.min_new_tokens}: must not be negative")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens="
                             f"{self.max_new_tokens}")

    @property
    def logprob_temperature(self) -> float:
        return 1.0 if self.greedy else self.temperature


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors (products stay below 2^63)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seed: int, seq_ids: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, vocab], a pure function of (seed, sequence id, step, token id)."""
    dev = seq_ids.device
    h = _mix32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=dev) ^ 0x9E3779B9)
    h = _mix32(h ^ (seq_ids.to(torch.int64) & _MASK32))
    h = _mix32(h ^ ((step * 0x632BE5AB) & _MASK32))
    v = torch.arange(vocab, dtype=torch.int64, device=dev)
    bits = _mix32(h[:, None] ^ ((v[None, :] * 0x2C1B3C6D) & _MASK32))
    u = (bits.double() + 0.5) / 2.0**32
    return -torch.log(-torch.log(u))


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, 1]: each row's k-th largest value, the smallest of its k largest (unsorted, so no sort
    of the k follows the selection). topk ranks NaN highest; as the largest it is not the k-th."""
    top = torch.topk(x, k, dim=-1, sorted=False).values
    return top.nan_to_num(nan=float("inf")).amin(-1, keepdim=True)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering; filtered entries become −inf. ``logits`` already / T."""
    if top_k and top_k < logits.shape[-1]:
        kth = kth_largest(logits, top_k)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token once the mass strictly before it already reaches top_p; keep the first
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, params: SamplingParams, seq_ids: torch.Tensor, step: int,
                  *, ban_ids: list[int] | None = None):
    """logits [B, V] (full vocabulary) -> (tokens [B], logprobs [B]).

    Log-probs are ``log_softmax(logits / T)`` over the full vocabulary at the chosen token — not the
    filtered distribution — so training can recompute exactly the same number."""
    logits = logits.float()
    scaled = logits / params.logprob_temperature
    logprobs_all = torch.log_softmax(scaled, dim=-1)
    choice = scaled
    if ban_ids:
        choice = choice.clone()
        choice[:, ban_ids] = float("-inf")
    if params.greedy:
        tokens = torch.argmax(choice, dim=-1)
    else:
        choice = filter_logits(choice, params.top_k, params.top_p)
        noise = gumbel_noise(params.seed, seq_ids, step, logits.shape[-1]).to(choice.dtype)
        tokens = torch.argmax(choice + noise, dim=-1)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)
