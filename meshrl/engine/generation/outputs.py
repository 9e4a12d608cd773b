"""What generation returns: per sequence its new tokens, their log-probs and why it stopped."""
from __future__ import annotations

from dataclasses import dataclass

FINISH_NAMES = {0: "length", 1: "eos", 2: "stop"}  # the finish codes both engines keep on the device


@dataclass
class GenerationResult:
    output_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reason: list[str]

    @staticmethod
    def concat(parts: list["GenerationResult"]) -> "GenerationResult":
        return GenerationResult([t for p in parts for t in p.output_ids],
                                [lp for p in parts for lp in p.logprobs],
                                [f for p in parts for f in p.finish_reason])


def to_result(tokens, logps, n_out, finish) -> GenerationResult:
    """Buffers (tokens/logps [B, width], counts and finish codes [B], on any device) to host lists,
    each row cut at its count."""
    n_out = n_out.tolist()
    return GenerationResult(
        output_ids=[t[:n] for t, n in zip(tokens.long().tolist(), n_out)],
        logprobs=[lp[:n] for lp, n in zip(logps.float().tolist(), n_out)],
        finish_reason=[FINISH_NAMES[int(f)] for f in finish.tolist()])
