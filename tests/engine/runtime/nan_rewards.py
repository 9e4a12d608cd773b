"""A verifier that goes bad mid-run, for the NaN-reward test: the toy `sevens` reward, except that
from its ``nan_at``-th call on (1-based; 0: never) the second sample's reward is NaN."""
from tests.engine.runtime.toy_rewards import sevens


class NanAtCall:
    def __init__(self, nan_at: int = 0):
        self.nan_at, self.calls = nan_at, 0

    def __call__(self, records, completions):
        self.calls += 1
        scores = sevens(records, completions)
        if self.nan_at and self.calls >= self.nan_at:
            scores[1] = float("nan")
        return scores
