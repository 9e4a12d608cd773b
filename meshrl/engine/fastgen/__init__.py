"""Fast generation: static KV cache, captured decode steps, pipelined microbatches, sharded sampling.
See ``engine.py``; ``generate.generate(..., engine="fast")`` routes here."""
from .engine import FastGenerator, FastOptions, generate_fast

__all__ = ["FastGenerator", "FastOptions", "generate_fast"]
