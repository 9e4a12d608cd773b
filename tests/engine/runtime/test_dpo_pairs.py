"""Iterative DPO's pairing: best against worst per prompt, ties and small margins skipped, and a
round that keeps nothing says so."""
import torch

from meshrl.engine.runtime.dpo import best_worst, no_pairs_message


def test_best_worst_pairs_and_skips():
    scores = torch.tensor([0.0, 1.0, 0.5,   # best 1, worst 0, margin 1
                           2.0, 2.0, 2.0,   # all tied: skipped
                           0.3, 0.1, 0.2])  # margin 0.2: kept without a floor, dropped at 0.5
    picks = best_worst(scores, 3, None)
    assert [(g, b, w) for g, b, w, _ in picks] == [(0, 1, 0), (2, 0, 1)]
    assert [round(m, 6) for *_, m in picks] == [1.0, 0.2]
    assert [g for g, *_ in best_worst(scores, 3, 0.5)] == [0]
    assert best_worst(scores, 3, 5.0) == []


def test_a_round_without_pairs_names_the_knobs():
    msg = no_pairs_message(3, 16, 0.5)
    assert msg.startswith("dpo round 3: no pairs from 16 prompts")
    assert "dpo.min_margin=0.5" in msg and "lower dpo.min_margin" in msg
    assert "dpo.samples_per_prompt" in msg and "\n" not in msg
    assert "min_margin" not in no_pairs_message(0, 4, None)
