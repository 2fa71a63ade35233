"""hessian_search: the gradient weighting changes the choice, steps stay representable, graphs stay exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import fxq
from fxq.ir import WEIGHTED_OPS
from conftest import assert_three_executors, tiny
from fxq.cli import main
from fxq.errors import CalibrationError
from fxq.fakequant import FakeQuant, _QWeighted


class Outlier(nn.Module):
    """Feature 0 of the hidden layer is 100x larger than the others, and the head ignores it."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.diag(torch.tensor([100.0] + [1.0] * 7)))
            self.hidden.bias.zero_()
            self.head.weight[:, 0] = 0.0

    def forward(self, x):
        return self.head(torch.relu(self.hidden(x)))


def _hidden_frac(qm) -> int:
    fq = [m for name, m in qm.fake.named_modules() if isinstance(m, FakeQuant) and "relu" in name]
    return int(fq[0].fmt.frac)


def test_gradient_weighting_ignores_what_the_loss_ignores():
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    plain = fxq.compile(Outlier().eval(), x, "shift-int", progress=False, bias_correction=None)
    searched = fxq.compile(Outlier().eval(), x, "shift-int", progress=False, bias_correction=None,
                           search="hessian", search_samples=0)
    # Squared error keeps the outlier (f near its no-clip value); the head never reads it, so its
    # gradient is zero and the Hessian metric spends the codes on the features that matter.
    assert _hidden_frac(searched) == _hidden_frac(plain) + plain.target.search_radius
    assert_three_executors(searched, x[:32])


@pytest.mark.parametrize("target,overrides", [("shift-int", {"w_bits": 4, "a_bits": 4}), ("fixed-point8", {})])
def test_steps_move_within_the_radius_and_stay_exact(images, target, overrides):
    model = tiny("residual")
    before = fxq.compile(model, images, target, progress=False, bias_correction=None, **overrides)
    after = fxq.compile(model, images, target, progress=False, bias_correction=None, search="hessian",
                        **overrides)
    r = after.target.search_radius
    mods = dict(before.fake.named_modules())
    moved = 0
    for name, m in after.fake.named_modules():
        if isinstance(m, _QWeighted):
            d = m.w_fmt.frac_array - mods[name].w_fmt.frac_array
            assert np.abs(d).max() <= r
            moved += int((d != 0).sum())
        elif isinstance(m, FakeQuant):
            assert abs(m.fmt.frac - mods[name].fmt.frac) <= r
    assert moved > 0
    # the graph's formats are what the fake-quant modules hold, and every executor agrees
    for node in after.fake.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], _QWeighted):
            assert node.meta["fxq.w_fmt"] == after.fake.get_submodule(node.target).w_fmt
    assert_three_executors(after, images)


def test_activations_mode_keeps_every_weight_step(images):
    model = tiny("residual")
    kw = dict(progress=False, bias_correction=None, w_bits=4, a_bits=4)
    plain = fxq.compile(model, images, "shift-int", **kw)
    full = fxq.compile(model, images, "shift-int", search="hessian", **kw)
    acts = fxq.compile(model, images, "shift-int", search="hessian-activations", **kw)
    w = lambda qm: {n: m.w_fmt.frac for n, m in qm.fake.named_modules() if isinstance(m, _QWeighted)}
    a = lambda qm: {n: m.fmt.frac for n, m in qm.fake.named_modules() if isinstance(m, FakeQuant)}
    assert w(acts) == w(plain) and w(full) != w(plain)       # the full search does move weights here
    assert a(full)
    assert a(acts) == a(full)                                 # the activation search is the same
    assert any("weight steps kept" in n and "0 weight channel step(s)" in n for n in acts.notes)
    assert_three_executors(acts, images)


def test_shared_residual_steps_stay_shared(images):
    qm = fxq.compile(tiny("residual"), images, "shift-int", progress=False, search="hessian", w_bits=4, a_bits=4)
    groups = {}
    for node in qm.fake.graph.nodes:
        if node.meta.get("fxq.kind") == "fake_quant" and node.args[0].meta.get("fxq.shared_with"):
            groups.setdefault(node.args[0].meta["fxq.shared_with"], set()).add(qm.fake.get_submodule(node.target).fmt.frac)
    assert groups and all(len(fracs) == 1 for fracs in groups.values())


def test_lowers_the_searched_formats_on_every_layer(images):
    qm = fxq.compile(tiny("inverted_residual"), images, "shift-int", progress=False, search="hessian", w_bits=4)
    irw = {n.name: n.attrs.w_frac for n in qm.ir.nodes if n.op in WEIGHTED_OPS}
    assert len(irw) == 6 and set(irw) <= {node.name for node in qm.fake.graph.nodes}
    for node in qm.fake.graph.nodes:
        if node.name in irw:
            assert irw[node.name] == tuple(int(f) for f in qm.fake.get_submodule(node.target).w_fmt.frac)


@pytest.mark.parametrize("kwargs,needle", [({"search": "mse"}, "search='mse'"),
                                           ({"search": "hessian", "search_samples": -2}, "search_samples=-2")])
def test_bad_options_are_named(images, kwargs, needle):
    with pytest.raises(CalibrationError, match=needle):
        fxq.compile(tiny("residual"), images, "shift-int", progress=False, **kwargs)


def test_needs_data():
    with pytest.raises(CalibrationError, match="needs calibration data"):
        fxq.compile(tiny("residual"), None, "shift-int", input_shape=(1, 1, 28, 28), progress=False, search="hessian")


def test_int8_keeps_its_dyadic_scales(images):
    qm = fxq.compile(tiny("residual"), images, "int8", progress=False, search="hessian")
    assert any("dyadic (int8) scales are kept" in n for n in qm.notes)
    assert_three_executors(qm, images)


def test_cli_search_option(tmp_path):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32))
    out = tmp_path / "m.fxq"
    r = CliRunner().invoke(main, ["compile", "test_cli:small_model", "-o", str(out), "--calib-npy", str(calib),
                                  "--search", "hessian", "--quiet"])
    assert r.exit_code == 0, r.output
    assert any("hessian search" in n for n in fxq.load(out).notes)
