"""calibrate: the float model runs on the calibration batches and fills every observer; skipped without data."""
from __future__ import annotations

from conftest import pass_ctx as ctx, run_until, tiny
from fxq import meta
from fxq.passes import calibrate, choose_formats, data_free_stats


def test_calibrate_fills_observers_and_choose_formats_picks_sign():
    gm, _ = run_until(tiny("residual"), choose_formats)
    assert sum(meta.OBSERVER in n.meta for n in gm.graph.nodes) == 10
    for n in gm.graph.nodes:
        if meta.OBSERVER in n.meta:
            assert n.meta[meta.OBSERVER].count > 0
            fmt = n.meta[meta.ACT_FMT]
            assert fmt.signed == (n.meta[meta.KIND] not in ("relu", "clamp", "avgpool"))
    w = [n.meta[meta.W_FMT] for n in gm.graph.nodes if meta.W_FMT in n.meta]
    assert len(w) == 6                             # stem, a, b, c, down, fc
    assert all(len(f.frac) > 0 and f.bits == 8 for f in w)


def test_calibrate_is_skipped_without_data_and_data_free_without_calibration():
    gm, _ = run_until(tiny("residual"), calibrate, ctx(calib=False))
    assert sum(meta.OBSERVER in n.meta for n in gm.graph.nodes) == 10
    assert all(n.meta[meta.OBSERVER].count == 0 for n in gm.graph.nodes if meta.OBSERVER in n.meta)
    gm, _ = run_until(tiny("residual"), data_free_stats, ctx(calib=True))
    assert not any(meta.DATA_FREE in n.meta for n in gm.graph.nodes)
