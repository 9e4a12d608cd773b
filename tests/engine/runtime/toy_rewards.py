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
