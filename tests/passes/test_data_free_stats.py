"""data_free_stats: observers filled from the folded BatchNorm statistics, without data."""
from __future__ import annotations

import pytest

from conftest import pass_ctx as ctx, run_until, tiny
from fxq import meta
from fxq.passes import data_free_stats


def test_data_free_stats_follow_bn_statistics():
    c = ctx(calib=False)
    c.input_range = (-1.0, 2.0)
    gm, c = run_until(tiny("residual"), data_free_stats, c)
    assert any("BatchNorm statistics" in n for n in c.notes)
    checked = 0
    for n in gm.graph.nodes:
        if n.meta.get(meta.ROLE) == "qpoint" and n.meta[meta.KIND] in meta.WEIGHTED and meta.BN_STATS in n.meta:
            checked += 1
            mean, std = n.meta[meta.DATA_FREE]
            stats = n.meta[meta.BN_STATS]
            assert mean == pytest.approx(stats.beta.mean(), abs=0.05)
    assert checked == 2                            # b and down: BN-folded convs without a fused ReLU
    obs = next(n for n in gm.graph.nodes if n.meta.get(meta.KIND) == "input").meta[meta.OBSERVER]
    assert obs.min >= -1.0 and obs.max <= 2.0 and obs.max > 1.9
