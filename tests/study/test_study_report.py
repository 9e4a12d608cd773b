"""The study's table: each method's change against its own seed's SFT model, the 2σ flag, samples,
and the comparison with PPO; and every cell's config is one the runtime accepts (a typo would
otherwise surface an hour into `make study`)."""
from meshrl.engine.runtime.config import load_run_config
from meshrl.study import study
from meshrl.study.pipeline import critic_free_cell, dpo_cell, ppo_cell, sft_cell

DATA = {"sft": "sft.jsonl", "prompts": "prompts.jsonl", "eval": "eval.jsonl"}


def test_every_cell_config_is_accepted():
    cells = [sft_cell(DATA, "m", steps=study.SFT_STEPS, seed=1, stop_at=study.SFT_TARGET),
             dpo_cell(DATA, "m", seed=1, rounds=1), *(ppo_cell(DATA, "m", seed=1, iterations=2, **kw)
                                                     for _, kw in study.ABLATION)]
    cells += [critic_free_cell(DATA, "m", seed=1, iterations=2, **kw) for _, kw in study.CRITIC_FREE]
    from meshrl.study.pipeline import COMMON, _merge
    for cell in cells:
        cfg = load_run_config(None, [], base=_merge(COMMON, cell))
        if cfg.algorithm == "grpo":  # the same sample budget as the PPO cell of batch 512
            assert cfg.grpo.batch_size * cfg.grpo.group_size == 512


def test_report_flags_changes_beyond_twice_their_spread():
    seeds = (1, 2, 3)
    names = ["SFT", "DPO", "DPO+SFT", "DPO-Iter", *(n for n, _ in study.ABLATION),
             *(n for n, _ in study.CRITIC_FREE)]
    sft = {1: 0.5, 2: 0.52, 3: 0.48}
    # GRPO gains +0.10, +0.11, +0.09 (mean 0.10, std 0.008): flagged; DPO −0.01, +0.02, −0.02: not
    gain = {"GRPO": [0.10, 0.11, 0.09], "DPO": [-0.01, 0.02, -0.02]}
    per_seed = {s: {n: {"pass_rate": sft[s] + gain.get(n, [0.0] * 3)[i], "seconds": 60.0,
                        **({"samples": 30720} if n not in ("SFT", "DPO", "DPO+SFT", "DPO-Iter") else {})}
                    for n in names} for i, s in enumerate(seeds)}
    text = study.report(per_seed, seeds)
    grpo = next(line for line in text.splitlines() if line.startswith("| GRPO |"))
    assert "0.100 ± 0.008 | yes | 30,720 | 3 |" in grpo
    dpo = next(line for line in text.splitlines() if line.startswith("| DPO |"))
    assert "| no | — | 3 |" in dpo
    assert "GRPO: +0.100 ± 0.008 (yes)" in text  # against PPO, which gained 0 here
    assert "| PPO | 0.500 ± 0.016 | 0.000 ± 0.000 | no | 30,720 |" in text
