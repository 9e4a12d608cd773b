"""Tokenizers from a model directory: meshrl's character tokenizer, or Hugging Face's (tokenizer.json
through tokenizers, tokenizer.model through sentencepiece)."""
from __future__ import annotations

import os
from collections.abc import Mapping


def load_tokenizer(model_dir: str):
    from meshrl.engine.tasks.char_tokenizer import CharTokenizer
    if CharTokenizer.is_saved_in(model_dir):
        return CharTokenizer.from_pretrained(model_dir)
    if not any(os.path.exists(os.path.join(model_dir, f))
               for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise FileNotFoundError(f"{model_dir}: no tokenizer (tokenizer.json, tokenizer.model or "
                                "char_tokenizer.json): copy the model's tokenizer files there")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def encode_prompt(tokenizer, text: str, *, chat_template: bool = False) -> list[int]:
    """Token ids of a prompt: as is, or wrapped by the tokenizer's chat template as a user turn."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat-template: this tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding (a Mapping, not a dict) when tokenize=True
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    return list(tokenizer.encode(text, add_special_tokens=True))
