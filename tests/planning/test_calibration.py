"""The CPU calibration (`python -m meshrl.planning.bench --calibrate`): its least-squares fit, and an
end-to-end run into a scratch rates file that `meshrl plan` then loads."""
import json
import math
import shutil

import pytest

from meshrl.engine.model.attention import DENSE_BLOCK_TOKENS
from meshrl.planning.bench import _fit, calibrate
from meshrl.planning.rates import default_rates_path, load_rates


def test_fit_recovers_known_terms_and_drops_negative_ones():
    rows = [(1, layers, flops, elem, 0.002 + 0.001 * layers + flops * 1e-11 + elem * 5e-8)
            for layers in (1, 4) for flops in (1e8, 4e8) for elem in (1e4, 3e4)]
    got = _fit(rows, ["mb_s", "layer_s", "inv_rate", "elem_s"])
    assert got == pytest.approx({"mb_s": 0.002, "layer_s": 0.001, "inv_rate": 1e-11, "elem_s": 5e-8})
    # a term the data would make negative is dropped (0) and the rest refitted
    rows = [(1, x, 3.0 - 0.5 * x) for x in (1, 2, 3)]
    assert _fit(rows, ["fixed", "slope"]) == {"fixed": pytest.approx(2.0), "slope": 0.0}


def test_calibrate_writes_rates_that_plan_loads(tmp_path):
    path = tmp_path / "rates.json"
    shutil.copy(default_rates_path(), path)
    values = calibrate(str(path), procs=2)
    doc = json.loads(path.read_text())["devices"]["cpu"]
    assert "2 processes measuring at once" in doc["doc"]
    r = load_rates("cpu", str(path))
    assert r.dense_attention_block == DENSE_BLOCK_TOKENS
    for key in ("train_tflops", "fwd_tflops", "copy_tbps", "link_gbps", "latency_s",
                "local_copy_gbps", "opt_s_per_param"):
        v = getattr(r, key)
        assert math.isfinite(v) and v > 0, (key, v)
        assert v == pytest.approx(values[key])
    # a CPU core does well under a TFLOP/s; a gloo collective between processes takes microseconds
    assert r.train_tflops < 5 and 1e-6 < r.latency_s < 0.05
