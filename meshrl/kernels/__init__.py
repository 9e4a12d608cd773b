"""Fused kernels: GAE, token log-probs/entropy (from logits or from hidden states), whitening.

Each has a chunked torch path (CPU) and a Triton kernel (CUDA); see `dispatch.py`.
"""
from .gae import gae
from .linear_logprobs import linear_token_logprobs
from .logprobs import token_logprobs
from .whiten import masked_whiten

__all__ = ["gae", "linear_token_logprobs", "masked_whiten", "token_logprobs"]
