"""fold_pool_divisor: every average pool divides by a power of two, the rest folded into the next layer."""
from __future__ import annotations

import pytest
import torch

from conftest import PASS_X as X, run_until, tiny
from fxq import meta
from fxq.passes import fold_pool_divisor


def test_fold_pool_divisor_makes_every_divisor_a_power_of_two():
    m = tiny("pools_and_pads")
    gm, _ = run_until(m, fold_pool_divisor)
    pools = [n for n in gm.graph.nodes if n.meta.get(meta.KIND) == "avgpool"]
    assert [p.args[6] for p in pools] == [16, 4]                    # 3x3 -> 16 (gain 16/9), 2x2 -> 4
    gains = [n.meta[meta.POOL_GAIN] for n in gm.graph.nodes if meta.POOL_GAIN in n.meta]
    assert gains == [pytest.approx(16 / 9)]
    with torch.no_grad():
        torch.testing.assert_close(gm(X), m(X), rtol=1e-5, atol=1e-5)
