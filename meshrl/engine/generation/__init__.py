"""Generation: the reference engine (``reference.py``), the fast engine (``fast.py``: continuous
batching over slots, shared prompt prefixes, static cache, CUDA graphs, pipelined microbatches,
sharded sampling), sampling (``sampling.py``, ``shard_sampling.py``), the outputs and their order
(``outputs.py``, ``sequences.py``), the entry points (``generate.py``) and the ``meshrl generate``
job (``job.py``)."""
from .fast import FastGenerator, FastOptions, generate_fast
from .forward import stage_pass
from .generate import ENGINES, choose_engine, generate, generator
from .outputs import GenerationResult
from .sampling import SamplingParams

__all__ = ["ENGINES", "FastGenerator", "FastOptions", "GenerationResult", "SamplingParams",
           "choose_engine", "generate", "generate_fast", "generator", "stage_pass"]
