"""The bundled task in miniature: arithmetic data files and a tiny model trained from scratch."""
from __future__ import annotations

import json
import os


from meshrl.engine.data.jsonl import write_jsonl
from meshrl.engine.model import build_stage, config_from_hf_dict, save_hf
from meshrl.engine.tasks import make_splits, make_tokenizer
from meshrl.parallel.layout import ParallelLayout

# A small Llama: 4 layers, hidden 128; the character vocabulary of the arithmetic task.
TINY_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)


def write_task_data(out_dir: str, *, n_train: int, n_eval: int, seed: int, digits=(1, 2)) -> dict:
    """SFT records (prompt, response), RL prompts (prompt, answer) and held-out prompts."""
    if all(os.path.exists(os.path.join(out_dir, f)) for f in ("sft.jsonl", "prompts.jsonl", "eval.jsonl")):
        return _paths(out_dir)
    train, held = make_splits(n_train, n_eval, seed, digits=tuple(digits))
    write_jsonl(os.path.join(out_dir, "sft.jsonl"),
                [{"prompt": r["prompt"], "response": r["answer"], "answer": r["answer"]} for r in train])
    write_jsonl(os.path.join(out_dir, "prompts.jsonl"), train)
    write_jsonl(os.path.join(out_dir, "eval.jsonl"), held)
    return _paths(out_dir)


def _paths(out_dir: str) -> dict:
    return {k: os.path.join(out_dir, f"{k}.jsonl") for k in ("sft", "prompts", "eval")}


def init_scratch_model(out_dir: str, *, seed: int, overrides: dict | None = None,
                       std: float = 0.02) -> str:
    """A randomly initialised HF-format model with the task's tokenizer (what SFT starts from).
    ``std`` is the matrices' init scale: tests raise it (e.g. 0.2) so that next-token distributions
    are far from uniform and temperature, attention and rotary bugs change the numbers."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    tok = make_tokenizer(("+",))
    cfg = config_from_hf_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": tok.vocab_size,
                               "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                               "pad_token_id": tok.pad_token_id, **TINY_MODEL, **(overrides or {})})
    stage = build_stage(ParallelLayout(ranks=[0]), config=cfg, seed=seed, init_std=std)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    save_hf(stage, out_dir)
    with open(os.path.join(out_dir, "meshrl_init.json"), "w") as f:
        json.dump({"seed": seed, "source": "meshrl.study.setup.init_scratch_model"}, f)
    return out_dir


__all__ = ["TINY_MODEL", "init_scratch_model", "write_task_data"]
