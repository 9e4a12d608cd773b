"""Rewards for the algorithm tests: simple enough that a randomly initialised tiny model moves
measurably in a few iterations, so "the metric moves the way the algorithm implies" can be tested
quickly (the arithmetic task needs minutes of SFT first)."""


def sevens(records, completions):
    """Fraction of the completion's characters that are '7'."""
    return [sum(ch == "7" for ch in c) / max(len(c), 1) for c in completions]


def constant(records, completions):
    """Every sample scores 0.5: no group ever has a spread (dynamic sampling cannot fill a batch)."""
    return [0.5 for _ in completions]


def always_right(records, completions):
    """Every sample passes: the held-out pass rate is 1 at the first evaluation."""
    return [1.0 for _ in completions]


def sevens_slow_on_rank_1(records, completions):
    """`sevens`, except that rank 1's third call marks the file MESHRL_TEST_MARK and then takes 5 s:
    the stopped-rank test stops rank 1 there, inside a known call (the verifier's scoring)."""
    import os
    import time
    sevens_slow_on_rank_1.calls = getattr(sevens_slow_on_rank_1, "calls", 0) + 1
    if os.environ.get("RANK") == "1" and sevens_slow_on_rank_1.calls == 3:
        open(os.environ["MESHRL_TEST_MARK"], "w").close()
        time.sleep(5)
    return sevens(records, completions)
