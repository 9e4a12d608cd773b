"""A character-level tokenizer for the bundled arithmetic task.

The CPU demo trains a tiny model from scratch, so it cannot rely on a downloaded tokenizer. This class
mimics the subset of a Hugging Face tokenizer the engine uses (`encode`, `decode`, `batch_decode`,
`__call__`, `__len__`, the special-token ids, `save_pretrained` / `from_pretrained`), so engine code
can take either without branching.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

DEFAULT_CHARS = "0123456789+-="
TOKENIZER_FILE = "char_tokenizer.json"


class CharTokenizer:
    """One id per character; ids 0, 1, 2 are PAD, BOS and EOS.

    `encode(text, add_special_tokens=True)` prepends BOS only, as Llama-family tokenizers do; the
    special-token strings (`<pad>`, `<s>`, `</s>`) are recognised inside text, so a training string
    such as `"1+2=3</s>"` encodes its EOS.
    """

    pad_token = "<pad>"
    bos_token = "<s>"
    eos_token = "</s>"
    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    # Engine code asks tokenizers for a chat template and applies one when present; this task has none.
    chat_template = None

    def __init__(self, chars: str = DEFAULT_CHARS):
        specials = (self.pad_token, self.bos_token, self.eos_token)
        if len(set(chars)) != len(chars):
            raise ValueError(f"CharTokenizer: duplicate characters in {chars!r}")
        self.chars = chars
        self._id_to_token = list(specials) + list(chars)
        self._token_to_id = {tok: i for i, tok in enumerate(self._id_to_token)}
        # Longest first, so no special string is split by a shorter one that prefixes it.
        alternation = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
        self._special_re = re.compile(f"({alternation})")

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def all_special_ids(self) -> list[int]:
        return [self.pad_token_id, self.bos_token_id, self.eos_token_id]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CharTokenizer(chars={self.chars!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens else []
        for piece in self._special_re.split(text):
            if piece in self._token_to_id and len(piece) > 1:
                ids.append(self._token_to_id[piece])
                continue
            for ch in piece:
                if ch not in self._token_to_id:
                    raise ValueError(f"CharTokenizer: character {ch!r} is not in the vocabulary {self.chars!r}")
                ids.append(self._token_to_id[ch])
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):  # torch tensors and numpy arrays, as HF accepts them
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        special = set(self.all_special_ids)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"CharTokenizer: id {i} is outside the vocabulary of {self.vocab_size}")
            if skip_special_tokens and i in special:
                continue
            out.append(self._id_to_token[i])
        return "".join(out)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, list]:
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._token_to_id[tokens]
        return [self._token_to_id[t] for t in tokens]

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENIZER_FILE)
        payload = {"type": "char", "chars": self.chars,
                   "special_tokens": {"pad": self.pad_token, "bos": self.bos_token, "eos": self.eos_token}}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        return [path]

    @classmethod
    def is_saved_in(cls, directory: str | os.PathLike) -> bool:
        """True when `directory` holds a saved CharTokenizer (so loaders can pick it over AutoTokenizer)."""
        return os.path.isfile(os.path.join(directory, TOKENIZER_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "CharTokenizer":
        path = os.path.join(directory, TOKENIZER_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"CharTokenizer: no {TOKENIZER_FILE} in {directory}") from None
        if payload.get("type") != "char" or not isinstance(payload.get("chars"), str):
            raise ValueError(f"{path}: not a CharTokenizer file (needs type 'char' and a 'chars' string)")
        return cls(payload["chars"])
