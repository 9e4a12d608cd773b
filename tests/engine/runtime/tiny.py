"""What the run-level tests share: a tiny Llama's shape, the toy reward's import path, and a work
directory holding a scratch model (with the arithmetic task's tokenizer) and arithmetic prompts."""
from meshrl.engine.data.jsonl import write_jsonl
from meshrl.engine.tasks import make_dataset
from meshrl.study.setup import init_scratch_model

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
SEVENS = "tests.engine.runtime.toy_rewards:sevens"


def tiny_task(tmp_path_factory, name: str, *, model_seed: int = 3, std: float = 0.02,
              prompts: int = 64, data_seed: int = 5, shape: dict = TINY):
    """(folder, model dir): ``prompts.jsonl`` holds 1–2-digit additions. std 0.2 gives next-token
    distributions far from uniform (temperature, clipping and greedy ties then matter). ``shape``:
    the model's HF config overrides (default the tiny Llama)."""
    d = tmp_path_factory.mktemp(name)
    model = init_scratch_model(str(d / "init"), seed=model_seed, overrides=shape, std=std)
    write_jsonl(d / "prompts.jsonl", make_dataset(prompts, seed=data_seed, digits=(1, 2)))
    return d, model
