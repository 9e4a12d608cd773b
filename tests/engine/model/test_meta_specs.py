import pytest

from meshrl.engine.model import LlamaStage, config_from_hf_dict, meta_specs
from meshrl.parallel.layout import ParallelLayout
from meshrl.parallel.realloc_plan import specs_for_layout

TINY = dict(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("tp,pp,dp,head", [(2, 2, 2, "lm"), (1, 2, 3, "value"), (4, 1, 2, "lm")])
def test_meta_specs_equal_a_stage_built_per_rank(tp, pp, dp, head):
    """One stage per (tp, pp) coordinate stands for its dp replicas."""
    cfg = config_from_hf_dict({"architectures": ["LlamaForCausalLM"], **TINY})
    lay = ParallelLayout(ranks=list(range(10, 10 + tp * pp * dp)), tp=tp, pp=pp, dp=dp, virtual=True)
    per_rank = specs_for_layout(lambda lo: LlamaStage(cfg, lo, head=head, device="meta"), lay)
    got = meta_specs(cfg, head, lay)
    assert list(got) == list(per_rank) and got == per_rank
