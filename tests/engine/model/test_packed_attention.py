"""Causal attention over packed sequences on CPU: the blocked path (runs of whole sequences, each
block one batched SDPA with its block-diagonal mask) against each sequence's own causal SDPA in
float64 — outputs and gradients — for short runs, sequences longer than a block, empty
sequences, a sliding window and grouped-query heads."""
import pytest
import torch
import torch.nn.functional as F

from meshrl.engine.model.attention import DENSE_BLOCK_TOKENS, PackedMeta, varlen_causal_attention


def oracle(q, k, v, lengths, window):
    """Each sequence alone: causal (and windowed) softmax attention, written out."""
    outs, start = [], 0
    rep = q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = q[start:start + n], k[start:start + n], v[start:start + n]
        ks, vs = ks.repeat_interleave(rep, 1), vs.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / qs.shape[-1] ** 0.5
        i = torch.arange(n)
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed &= i[:, None] - i[None, :] < window
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", F.softmax(scores, -1), vs))
        start += n
    return torch.cat(outs) if outs else q[:0]


CASES = {
    "many short": [17, 23, 5, 30, 11] * 12,
    "longer than a block": [DENSE_BLOCK_TOKENS + 40, 9, 12, 2 * DENSE_BLOCK_TOKENS, 3],
    "empty sequences": [0, 12, 0, 0, 7, DENSE_BLOCK_TOKENS, 1],
    "one sequence": [40],
    "exactly a block": [DENSE_BLOCK_TOKENS - 6, 6, DENSE_BLOCK_TOKENS],
}


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_attention_matches_each_sequence_alone(case, window):
    lengths = CASES[case]
    n = sum(lengths)
    g = torch.Generator().manual_seed(len(lengths))
    q, k, v = (torch.randn(n, h, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for h in (4, 2, 2))
    got = varlen_causal_attention(q, k, v, PackedMeta.from_lengths(lengths), window=window)
    want = oracle(q, k, v, lengths, window)
    torch.testing.assert_close(got, want)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)
