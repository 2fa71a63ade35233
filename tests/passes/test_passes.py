"""Each pass on tiny graphs: what it reads, what it writes, what it refuses."""
from __future__ import annotations

import copy
import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_MODELS, tiny
from fxq import meta
from fxq.context import CompileContext
from fxq.passes import (PIPELINE, calibrate, canonicalize, choose_formats, data_free_stats, fold_bn,
                        fold_pool_divisor, insert_observers, share_scales)
from fxq.pipeline import run_passes
from fxq.targets import get_target
from fxq.trace import trace

X = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def ctx(calib=True, **kw):
    return CompileContext(get_target("shift-int", **kw), X[:1], [X] if calib else None, progress=False)


def run_until(model, last, c=None):
    c = c or ctx()
    passes = PIPELINE[: PIPELINE.index(last) + 1]
    return run_passes(trace(copy.deepcopy(model)), c, passes), c


class Spellings(nn.Module):
    """The same ops written every way canonicalize must unify."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.relu6 = nn.ReLU6()

    def forward(self, x):
        x = self.conv(x)
        a = F.relu(x) + torch.relu(x)
        b = torch.add(self.relu(x), x.relu())
        c = self.relu6(a) + F.hardtanh(b, 0.0, 6.0) + torch.clamp(a, 0, 6) + F.relu6(b)
        d = torch.cat([c, c], 1)
        e = torch.concat([d, d], dim=-3)
        return e.view(e.size(0), -1)


def test_canonicalize_one_spelling_per_op():
    model = Spellings().eval()
    gm, _ = run_until(model, canonicalize)
    kinds = [n.meta[meta.KIND] for n in gm.graph.nodes]
    assert kinds.count("relu") == 4 and kinds.count("clamp") == 4 and kinds.count("add") == 5
    assert kinds.count("cat") == 2 and kinds.count("flatten") == 1
    targets = {n.meta[meta.KIND]: n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert targets["relu"] is torch.relu and targets["add"] is operator.add and targets["clamp"] is torch.clamp
    assert all(n.op != "call_method" for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))


def test_canonicalize_keeps_numerics_and_removes_identity_dropout():
    m = tiny("inverted_residual")
    gm, _ = run_until(m, canonicalize)
    assert not any(isinstance(mod, (nn.Dropout, nn.Identity)) for mod in gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(X), m(X))


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_fold_bn_is_numerically_equal_and_keeps_statistics(name):
    m = tiny(name)
    gm, _ = run_until(m, fold_bn)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(X), m(X), rtol=1e-4, atol=1e-4)
    bn_count = sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    stats = [n.meta[meta.BN_STATS] for n in gm.graph.nodes if meta.BN_STATS in n.meta]
    assert len(stats) == bn_count
    first_bn = next((mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)), None)
    assert first_bn is None or any(np.allclose(s.mean, first_bn.running_mean.numpy()) for s in stats)


def test_fold_bn_refuses_a_lone_batchnorm():
    from fxq.errors import UnsupportedOp
    m = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3)).eval()
    with pytest.raises(UnsupportedOp, match="BatchNorm is folded into the conv or linear right before it"):
        run_until(m, fold_bn)


def test_fold_pool_divisor_makes_every_divisor_a_power_of_two():
    m = tiny("pools_and_pads")
    gm, _ = run_until(m, fold_pool_divisor)
    pools = [n for n in gm.graph.nodes if n.meta.get(meta.KIND) == "avgpool"]
    assert [p.args[6] for p in pools] == [16, 4]                    # 3x3 -> 16 (gain 16/9), 2x2 -> 4
    gains = [n.meta[meta.POOL_GAIN] for n in gm.graph.nodes if meta.POOL_GAIN in n.meta]
    assert gains == [pytest.approx(16 / 9)]
    with torch.no_grad():
        torch.testing.assert_close(gm(X), m(X), rtol=1e-5, atol=1e-5)


def test_insert_observers_roles():
    gm, _ = run_until(tiny("residual"), insert_observers)
    roles = {n.name: n.meta[meta.ROLE] for n in gm.graph.nodes}
    fused = {n.name: n.meta[meta.FUSED_ACT] for n in gm.graph.nodes if meta.FUSED_ACT in n.meta}
    assert roles["x"] == "input" and roles["output"] == "output"
    for producer, act in fused.items():
        assert roles[producer] == "acc" and roles[act] == "qpoint"
    assert all(roles[n.name] == "pass" for n in gm.graph.nodes if n.meta[meta.KIND] == "flatten")
    assert all((meta.OBSERVER in n.meta) == (roles[n.name] in ("qpoint", "input")) for n in gm.graph.nodes)


def test_calibrate_fills_observers_and_choose_formats_picks_sign():
    gm, _ = run_until(tiny("residual"), choose_formats)
    for n in gm.graph.nodes:
        if meta.OBSERVER in n.meta:
            assert n.meta[meta.OBSERVER].count > 0
            fmt = n.meta[meta.ACT_FMT]
            assert fmt.signed == (n.meta[meta.KIND] not in ("relu", "clamp", "avgpool"))
    w = [n.meta[meta.W_FMT] for n in gm.graph.nodes if meta.W_FMT in n.meta]
    assert all(len(f.frac) > 0 and f.bits == 8 for f in w)


def test_choose_formats_relu6_uses_the_code_range():
    """A ReLU6 output that reaches 6 must get a step of 2**-5 (codes up to 192), not a coarse one."""
    gm, _ = run_until(tiny("inverted_residual"), choose_formats)
    clamps = [n for n in gm.graph.nodes if n.meta[meta.KIND] == "clamp" and meta.ACT_FMT in n.meta]
    assert clamps
    for n in clamps:
        obs, fmt = n.meta[meta.OBSERVER], n.meta[meta.ACT_FMT]
        top = min(obs.max, 6.0)
        assert fmt.frac >= np.floor(np.log2(255 / top)), (n.name, fmt, top)      # no coarser than no-clip
        assert fmt.range.hi >= 128 or fmt.range.hi >= top * 2.0 ** fmt.frac, (n.name, fmt)


def test_choose_formats_per_tensor_weights():
    gm, _ = run_until(tiny("residual"), choose_formats, ctx(w_granularity="tensor"))
    assert all(len(set(n.meta[meta.W_FMT].frac)) == 1 for n in gm.graph.nodes if meta.W_FMT in n.meta)


def test_share_scales_master_is_widest_and_siblings_follow():
    before, _ = run_until(tiny("residual"), choose_formats)
    fracs_before = {n.name: n.meta[meta.ACT_FMT].frac for n in before.graph.nodes if meta.ACT_FMT in n.meta}
    gm, _ = run_until(tiny("residual"), share_scales)
    groups = {}
    for n in gm.graph.nodes:
        if meta.SHARED_WITH in n.meta:
            groups.setdefault(n.meta[meta.SHARED_WITH], []).append(n)
    assert groups, "the residual model has adds, so some formats are shared"
    for master, members in groups.items():
        assert len({m.meta[meta.ACT_FMT].frac for m in members}) == 1
        assert members[0].meta[meta.ACT_FMT].frac == min(fracs_before[m.name] for m in members)
        assert fracs_before[master] == members[0].meta[meta.ACT_FMT].frac


def test_share_scales_off_when_target_does_not_require_it():
    gm, _ = run_until(tiny("residual"), share_scales, ctx(share_residual_scales=False))
    assert not any(meta.SHARED_WITH in n.meta for n in gm.graph.nodes)


def test_data_free_stats_follow_bn_statistics():
    c = ctx(calib=False)
    c.input_range = (-1.0, 2.0)
    gm, c = run_until(tiny("residual"), data_free_stats, c)
    assert any("BatchNorm statistics" in n for n in c.notes)
    for n in gm.graph.nodes:
        if n.meta.get(meta.ROLE) == "qpoint" and n.meta[meta.KIND] in meta.WEIGHTED and meta.BN_STATS in n.meta:
            mean, std = n.meta[meta.DATA_FREE]
            stats = n.meta[meta.BN_STATS]
            assert mean == pytest.approx(stats.beta.mean(), abs=0.05)
    obs = next(n for n in gm.graph.nodes if n.meta.get(meta.KIND) == "input").meta[meta.OBSERVER]
    assert obs.min >= -1.0 and obs.max <= 2.0 and obs.max > 1.9


def test_calibrate_is_skipped_without_data_and_data_free_without_calibration():
    gm, _ = run_until(tiny("residual"), calibrate, ctx(calib=False))
    assert all(n.meta[meta.OBSERVER].count == 0 for n in gm.graph.nodes if meta.OBSERVER in n.meta)
    gm, _ = run_until(tiny("residual"), data_free_stats, ctx(calib=True))
    assert not any(meta.DATA_FREE in n.meta for n in gm.graph.nodes)


def test_fake_quant_model_values_sit_on_their_grids():
    gm, _ = run_until(tiny("concat"), PIPELINE[-1])
    values = {}

    class Grab(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.meta.get(meta.KIND) == "fake_quant":
                values[n.name] = (out, n.meta[meta.ACT_FMT])
            return out
    with torch.no_grad():
        Grab(gm.double()).run(X.double())
    for name, (v, fmt) in values.items():
        codes = v * 2.0 ** fmt.frac
        assert torch.equal(codes, torch.round(codes)), name
        assert codes.min() >= fmt.range.lo and codes.max() <= fmt.range.hi
