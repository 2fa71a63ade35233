"""The built-in targets (fixed-point8, dfp-cluster, int8) on every tiny model: exact, and doing what they claim."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fxq
from conftest import TINY_MODELS, assert_three_executors, tiny
from fxq import meta
from fxq.clusters import _ternary_l2, quantize_clusters
from fxq.formats import std_frac
from fxq.ir import CLUSTER_OPS, WEIGHTED_OPS, Op
from fxq.qtypes import ClusterFormat
from fxq.report import multiplications

X = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))

CONFIGS = {
    "fixed-point8": ("fixed-point8", {}),
    "ternary-N4": ("dfp-cluster", {}),
    "4bit-N4": ("dfp-cluster", {"w_bits": 4}),
    "4bit-N3-ragged": ("dfp-cluster", {"w_bits": 4, "cluster_size": 3}),
    "ternary-per-filter": ("dfp-cluster", {"cluster_size": 0}),
    "ternary-twn": ("dfp-cluster", {"ternary_threshold": "twn"}),
    "shift-int-w12": ("shift-int", {"w_bits": 12}),       # accumulators past 2**24: sliced ONNX sums
    "int8": ("int8", {}),
    "int8-per-tensor-wide-multipliers": ("int8", {"w_granularity": "tensor", "multiplier_bits": 21,
                                                  "scale_mant_bits": 12}),
}


@pytest.mark.parametrize("model", sorted(TINY_MODELS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_three_executors_agree(config, model):
    target, overrides = CONFIGS[config]
    qm = fxq.compile(tiny(model), X, target=target, progress=False, **overrides)
    assert_three_executors(qm, X * 3)      # x3: saturating inputs, full-range codes


def test_fixed_point8_fractional_lengths_follow_the_std_rule():
    qm = fxq.compile(tiny("residual"), X, target="fixed-point8", progress=False)
    gm = qm.fake
    t = fxq.get_target("fixed-point8")
    checked = 0
    for node in gm.graph.nodes:
        fmt = node.meta.get(meta.ACT_FMT)
        if node.meta.get(meta.KIND) == "fake_quant" or fmt is None or meta.SHARED_WITH in node.meta:
            continue
        obs = node.meta.get(meta.OBSERVER)
        if obs is None:
            continue
        c, std = (t.std_coeff_signed, obs.std) if fmt.signed else (t.std_coeff_unsigned, obs.pre_std)
        assert fmt.frac == math.floor(math.log2(c / std)), node.name
        checked += 1
    assert checked >= 3


def test_std_frac_matches_f8net_constants():
    # sigma = 1: floor(log2 40) = 5 signed, floor(log2 70) = 6 unsigned; 4-bit codes scale c by 2**-4
    assert std_frac(np.array([1.0]), 40.0, 8)[0] == 5
    assert std_frac(np.array([1.0]), 70.0, 8)[0] == 6
    assert std_frac(np.array([0.01]), 40.0, 8)[0] == 11
    assert std_frac(np.array([1.0]), 40.0, 4)[0] == 1
    assert std_frac(np.array([0.0]), 40.0, 8)[0] == 7          # dead channel: neutral format


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=1, max_size=9))
def test_ternary_threshold_is_l2_optimal(values):
    row = np.array(values, np.float64)[None, None, :]
    signs, alpha = _ternary_l2(row)
    err = ((row - alpha[..., None] * signs) ** 2).sum()
    mags = np.abs(row).ravel()
    best = (row ** 2).sum()                                   # all zeros
    for t in mags[mags > 0]:                                  # every support by threshold, with its best alpha
        keep = np.abs(row) >= t
        a = np.abs(row)[keep].mean()
        best = min(best, ((row - a * np.sign(row) * keep) ** 2).sum())
    assert err <= best + 1e-12


def test_cluster_accumulation_then_scale_equals_the_reference():
    """The IR's claim, computed the long way: per cluster, sum code x input (adds for ternary), then one
    multiply by the cluster's scale code, summed over clusters, plus bias."""
    qm = fxq.compile(tiny("residual"), X, target="dfp-cluster", cluster_size=3, edge_w_bits=None, progress=False)
    from fxq.backends.reference import execute
    env = execute(qm.ir, X.numpy(), keep=True)
    nodes = [n for n in qm.ir.nodes if n.op is Op.CONV2D_CLUSTER and n.attrs.groups == 1]
    assert nodes
    for n in nodes:
        x = torch.from_numpy(env[n.inputs[0]].astype(np.float64))
        t, alpha, block = n.consts["t"].astype(np.float64), n.consts["alpha"].astype(np.int64), n.attrs.cluster_size
        acc = np.zeros(env[n.name].shape, np.int64)
        for j in range(alpha.shape[1]):
            sl = slice(j * block, (j + 1) * block)
            part = F.conv2d(x[:, sl], torch.from_numpy(t[:, sl]), None, n.attrs.stride, n.attrs.padding,
                            n.attrs.dilation).numpy()
            assert np.all(part == np.rint(part))
            acc += part.astype(np.int64) * alpha[:, j][None, :, None, None]
        acc += n.consts["b"].astype(np.int64)[None, :, None, None]
        np.testing.assert_array_equal(acc, env[n.name])


def test_ternary_codes_and_scales_are_what_the_format_says():
    w = np.random.default_rng(0).standard_normal((6, 8, 3, 3))
    fmt = ClusterFormat((9,) * 6, bits=2, size=4, scale_bits=8)
    cc = quantize_clusters(w, fmt)
    assert set(np.unique(cc.codes)) <= {-1, 0, 1}
    assert cc.alpha.shape == (6, 2) and cc.alpha.min() >= 0 and cc.alpha.max() <= 255
    assert np.all(np.sign(cc.codes) * np.sign(w) >= 0)     # a kept weight keeps its sign


@pytest.mark.parametrize("n,k", [(4, 3), (2, 1), (8, 3)])
def test_multiplications_replaced_is_one_minus_one_over_n_k2(n, k):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 8, k, padding=k // 2), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 28 * 28, 10)).eval()
    qm = fxq.compile(model, X, target="dfp-cluster", cluster_size=n, progress=False)
    conv = next(x for x in qm.ir.nodes if x.op is Op.CONV2D_CLUSTER)
    macs, left = multiplications(conv)
    assert 1 - left / macs == pytest.approx(1 - 1 / (n * k * k))
    row = next(r for r in qm.report().rows if r["layer"] == f"{conv.name}_rq")
    assert row["mult->acc"] == f"{100 * (1 - 1 / (n * k * k)):.1f}%"
    assert "multiplications replaced by accumulations" in qm.report().summary


def test_edge_layers_keep_eight_bit_weights():
    qm = fxq.compile(tiny("residual"), X, target="dfp-cluster", progress=False)
    weighted = [n for n in qm.ir.nodes if n.op in (Op.CONV2D_INT, Op.LINEAR_INT, *CLUSTER_OPS)]
    assert weighted[0].op is Op.CONV2D_INT and weighted[-1].op is Op.LINEAR_INT
    assert weighted[0].attrs.w_bits == 8 and weighted[-1].attrs.w_bits == 8
    assert len(weighted) == 6                       # stem, a, b, c, down, fc
    assert all(n.op in CLUSTER_OPS for n in weighted[1:-1])


def test_cluster_ir_prints_codes_clusters_and_scales():
    qm = fxq.compile(tiny("residual"), X, target="dfp-cluster", progress=False)
    text = str(qm.ir)
    assert "conv2d_cluster(" in text and "t:tern[" in text and "sum/4ch x a:u8[" in text


@pytest.mark.parametrize("target,overrides,field", [
    ("shift-int", {"cluster_size": 8}, "cluster_size"),
    ("fixed-point8", {"ternary_threshold": "twn"}, "ternary_threshold"),
    ("dfp-cluster", {"w_bits": 9}, "w_bits"),
    ("dfp-cluster", {"cluster_size": -1}, "cluster_size"),
    ("dfp-cluster", {"ternary_threshold": "median"}, "ternary_threshold"),
    ("dfp-cluster", {"cluster_scale_bits": 1}, "cluster_scale_bits"),
    ("fixed-point8", {"std_coeff_signed": 0}, "std_coeff_signed"),
    ("fixed-point8", {"scale_kind": "log2"}, "scale_kind"),
    ("dfp-cluster", {"edge_w_bits": 1}, "edge_w_bits"),
    ("shift-int", {"edge_a_bits": 40}, "edge_a_bits"),
    ("dfp-cluster", {"w_full_range": True}, "w_full_range"),
    ("shift-int", {"search_radius": 9}, "search_radius"),
])
def test_impossible_overrides_name_the_field(target, overrides, field):
    with pytest.raises(fxq.TargetError, match=field):
        fxq.compile(tiny("residual"), X, target=target, progress=False, **overrides)


def test_report_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    qm = fxq.compile(tiny("residual"), X, target="dfp-cluster", w_bits=4, progress=False)
    rep = qm.report(X[:8])
    rep.plot(tmp_path / "sqnr.png")
    assert (tmp_path / "sqnr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="qm.report"):
        qm.report().plot(tmp_path / "none.png")


@pytest.mark.parametrize("target", ["shift-int", "fixed-point8", "int8", "dfp-cluster"])
def test_dead_channel_with_a_large_bias_fits_the_accumulator(target):
    """A BN with gamma ~ 0 folds into near-zero weights and a large bias (EfficientNet-Lite1's stem has
    such channels): the weight step must widen so the bias code fits int32, not saturate or fail."""
    model = tiny("residual")
    bn = model.stem[1]
    bn.weight.data[:3] = 1e-9
    bn.bias.data[:3] = 4.0
    qm = fxq.compile(model, X, target=target, progress=False)
    assert any("coarser weight step" in n for n in qm.notes)
    assert_three_executors(qm, X)
    folded = qm.fake.get_submodule("stem.0").qbias().detach()[:3]
    assert torch.allclose(folded, torch.full((3,), 4.0, dtype=folded.dtype), rtol=1e-3)


def test_edge_activations_keep_their_bits():
    qm = fxq.compile(tiny("residual"), X, "shift-int", w_bits=4, a_bits=4, edge_a_bits=8, progress=False)
    nodes = qm.ir.nodes
    quantize = next(n for n in nodes if n.op == "quantize")
    last = [n for n in nodes if n.op in WEIGHTED_OPS][-1]
    logits = qm.ir.node(qm.ir.output).inputs[0]
    types = {n.name: n.out for n in nodes}
    assert quantize.out.hi - quantize.out.lo == 255                       # the image: 8-bit codes
    assert types[last.inputs[0]].hi - types[last.inputs[0]].lo == 255     # the classifier's input
    assert types[logits].hi - types[logits].lo == 255                     # the logits
    inner = [n.out for n in nodes if n.op == "requant" and n.name != logits]
    assert inner and all(t.hi - t.lo <= 15 for t in inner)                # the rest: 4-bit codes
    assert_three_executors(qm, X[:16])


def test_full_range_weights_reach_the_negative_code():
    qm = fxq.compile(tiny("residual"), X, "shift-int", w_bits=2, w_full_range=True, progress=False)
    codes = np.concatenate([n.consts["w"].ravel() for n in qm.ir.nodes if "w" in n.consts])
    assert codes.min() == -2 and codes.max() <= 1                          # four levels, -2..1
    sym = fxq.compile(tiny("residual"), X, "shift-int", w_bits=2, progress=False)
    codes = np.concatenate([n.consts["w"].ravel() for n in sym.ir.nodes if "w" in n.consts])
    assert codes.min() == -1 and codes.max() == 1                          # ternary
    assert_three_executors(qm, X[:16])
