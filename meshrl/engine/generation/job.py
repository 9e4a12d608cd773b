"""`meshrl generate`: JSONL prompts in, JSONL completions out, under torchrun or one process.

Input lines hold ``prompt`` (text, tokenized as is unless ``--chat-template``) or ``input_ids``; other
fields pass through and order is preserved. Output adds ``output_ids``, ``completion``, ``logprobs``
and ``finish_reason``; with ``--samples-per-prompt K`` each input line gives K output lines in a row,
numbered by ``sample``. dp = world / (tp·pp); replica d takes a contiguous block of the prompts and
decodes ``--batch-size`` sequences at a time (the fast engine refills a slot as soon as its sequence
finishes; its samples share the prompt's prefill). ``--ep`` splits a mixture-of-experts model's
experts over groups of ep replicas, which then step together.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from meshrl.parallel.layout import LayoutError, ParallelLayout

from ..data.jsonl import DataError, write_jsonl
from ..data.records import read_data
from ..data.tokenizer import encode_prompt, load_tokenizer
from ..distributed import init_distributed, world
from ..model import build_stage, load_config
from .generate import ENGINES, generate
from .sampling import SamplingParams

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(p):
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--prompts", required=True, help="input .jsonl or .parquet (prompt or input_ids per row)")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1,
                   help="expert parallelism (MoE models): experts split over ep of the dp replicas")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--stop-ids", type=int, nargs="*", default=[])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-template", action="store_true", help="wrap text prompts in the chat template")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--samples-per-prompt", type=int, default=1,
                   help="completions per prompt (K output lines per input line, field 'sample')")
    p.add_argument("--batch-size", type=int, default=64,
                   help="sequences decoded at once per replica (the fast engine's slots)")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="generation engine: auto (fast on CUDA, else reference; $MESHRL_GENERATE "
                        "overrides), fast, reference")


def _prompt_ids(records, path, tokenizer, chat_template, vocab_size):
    out = []
    for lineno, rec in records:
        where = f"{path}:{lineno}"
        if "input_ids" in rec:
            ids = rec["input_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
                raise DataError(f"{where}: field 'input_ids' must be a non-empty list of ints")
            if max(ids) >= vocab_size or min(ids) < 0:
                raise DataError(f"{where}: field 'input_ids' has ids outside the vocabulary of {vocab_size}")
        elif "prompt" in rec:
            if not isinstance(rec["prompt"], str):
                raise DataError(f"{where}: field 'prompt' must be a string")
            if tokenizer is None:
                raise DataError(f"{where}: field 'prompt' needs a tokenizer in the model directory "
                                "(or give input_ids)")
            ids = encode_prompt(tokenizer, rec["prompt"], chat_template=chat_template)
        else:
            raise DataError(f"{where}: missing field 'prompt' (or 'input_ids')")
        out.append(ids)
    return out


def _check_args(args):
    for flag in ("tp", "pp", "ep", "batch_size", "max_new_tokens", "samples_per_prompt"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be at least 1")


def _check_fits(prompts, records, path, args, cfg):
    """Every prompt plus --max-new-tokens within the model's context; stop ids in its vocabulary."""
    bad = [t for t in args.stop_ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"--stop-ids {bad}: outside the vocabulary of {cfg.vocab_size}")
    for ids, (lineno, _) in zip(prompts, records):
        if len(ids) + args.max_new_tokens > cfg.max_position_embeddings:
            raise DataError(f"{path}:{lineno}: the prompt's {len(ids)} tokens and --max-new-tokens="
                            f"{args.max_new_tokens} pass the model's context of "
                            f"{cfg.max_position_embeddings}: shorten the prompt or lower --max-new-tokens")


def run(args) -> int:
    _check_args(args)
    device = init_distributed()
    n = world()
    if n % (args.tp * args.pp):
        raise LayoutError(f"world size {n} is not divisible by tp*pp={args.tp * args.pp}: "
                          "launch tp*pp*dp processes")
    layout = ParallelLayout(ranks=list(range(n)), tp=args.tp, pp=args.pp, dp=n // (args.tp * args.pp),
                            ep=args.ep, name="generate")
    cfg = load_config(args.model)
    try:
        tokenizer = load_tokenizer(args.model)
    except FileNotFoundError:
        tokenizer = None
    records = read_data(args.prompts)
    prompts = _prompt_ids(records, args.prompts, tokenizer, args.chat_template, cfg.vocab_size)
    _check_fits(prompts, records, args.prompts, args, cfg)
    eos = set(cfg.eos_ids) | ({tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None)
                              is not None else set())
    params = SamplingParams(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                            greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, eos_ids=sorted(eos), stop_ids=args.stop_ids,
                            seed=args.seed)
    stage = build_stage(layout, model_dir=args.model, dtype=DTYPES[args.dtype], device=device)
    k = args.samples_per_prompt
    lo = layout.dp_rank * len(prompts) // layout.dp_size
    hi = (layout.dp_rank + 1) * len(prompts) // layout.dp_size
    mine = {}
    if hi > lo or layout.ep_size > 1:  # an ep group's replicas all run, with prompts or not
        r = generate(stage, prompts[lo:hi], params, seq_offset=lo * k, device=device,
                     engine=None if args.engine == "auto" else args.engine, samples=k,
                     slots=args.batch_size)
        for j in range(len(r.output_ids)):
            mine[lo * k + j] = (r.output_ids[j], r.logprobs[j], r.finish_reason[j])
    results = _gather_to_rank0(mine if layout.is_last_stage and layout.tp_rank == 0 else {})
    if results is not None:
        out = []
        for i, (_, rec) in enumerate(records):
            for sample in range(k):
                ids, logps, reason = results[i * k + sample]
                text = (tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None
                        else None)
                extra = {"sample": sample} if k > 1 else {}
                out.append({**rec, **extra, "output_ids": ids, "completion": text,
                            "logprobs": logps, "finish_reason": reason})
        write_jsonl(args.out, out)
        print(f"wrote {len(out)} completions to {args.out}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _gather_to_rank0(part: dict):
    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(part, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for p in parts:
        merged.update(p)
    return merged
