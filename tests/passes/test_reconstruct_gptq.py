"""reconstruct mode "gptq": input moments, rounding no worse than nearest on the layers' own inputs, and
the integer graph it leaves (on the grid, exact, deterministic)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from conftest import assert_three_executors, tiny
from fxq.context import CompileContext, ReconstructOptions
from fxq.errors import CalibrationError, UnsupportedOp
from fxq.fakequant import QConv2d, _QWeighted, set_quantization
from fxq.passes import PIPELINE, reconstruct
from fxq.pipeline import run_passes
from fxq.targets import get_target
from fxq.trace import trace
from passes.reconstruct_gptq import _Moments

X = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(7))


def _hessians(qm, x):
    """Input moments of every layer in the float model, by _Moments itself."""
    layers = {n: m for n, m in qm.fake.named_modules() if isinstance(m, _QWeighted)}
    acc = {n: _Moments(m) for n, m in layers.items()}
    hooks = [layers[n].register_forward_hook(a) for n, a in acc.items()]
    set_quantization(qm.fake, False)
    with torch.no_grad():
        qm.fake(x)
    set_quantization(qm.fake, True)
    for h in hooks:
        h.remove()
    return layers, {n: a.hessian() for n, a in acc.items()}


def _layer_errors(qm, x):
    """E||(W - Q) x||² per layer, Q the weights the integer graph uses, x the float model's input."""
    layers, hess = _hessians(qm, x)
    out = {}
    for name, m in layers.items():
        g = hess[name].shape[0]
        d = (m.weight.detach().double() - m.qweight().detach().double()).reshape(g, m.weight.shape[0] // g, -1)
        out[name] = float(torch.einsum("grk,gkj,grj->", d, hess[name], d))
    return out


def test_depthwise_moments_match_the_patches():
    conv = QConv2d.__new__(QConv2d)
    nn.Module.__init__(conv)
    conv.weight = nn.Parameter(torch.zeros(2, 1, 3, 3))
    conv.stride, conv.padding, conv.dilation, conv.groups = (2, 2), (1, 1), (1, 1), 2
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    acc = _Moments(conv)
    acc(conv, (x,), None)
    padded = F.pad(x, (1, 1, 1, 1)).double()
    for c in range(2):
        patches = [padded[n, c, i:i + 3, j:j + 3].reshape(-1) for n in range(3) for i in (0, 2, 4) for j in (0, 2, 4)]
        p = torch.stack(patches)
        assert torch.allclose(acc.hessian()[c], p.T @ p / len(patches))


def test_linear_moments_cover_every_token():
    lin = fxq.fakequant.QLinear.__new__(fxq.fakequant.QLinear)
    nn.Module.__init__(lin)
    lin.weight = nn.Parameter(torch.zeros(3, 4))
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))
    acc = _Moments(lin)
    acc(lin, (x,), None)
    rows = x.reshape(-1, 4).double()
    assert torch.allclose(acc.hessian()[0], rows.T @ rows / 10)


@pytest.mark.parametrize("name", ["inverted_residual", "residual", "pools_and_pads"])
def test_output_error_no_worse_than_nearest(name):
    """Per layer on its own float input: OBQ's greedy order may lose on a small layer, so the sum over the
    model must fall, and no layer may get much worse."""
    kw = {"w_bits": 4, "a_bits": 8, "bias_correction": None, "progress": False}
    nearest = _layer_errors(fxq.compile(tiny(name), X, "shift-int", **kw), X)
    gptq = _layer_errors(fxq.compile(tiny(name), X, "shift-int", reconstruct={"mode": "gptq", "samples": 48}, **kw), X)
    assert sum(gptq.values()) < 0.8 * sum(nearest.values())
    assert all(gptq[n] <= 1.1 * nearest[n] + 1e-12 for n in nearest)


def test_weights_on_the_grid_exact_and_deterministic():
    runs = [fxq.compile(tiny("inverted_residual"), X, "shift-int", progress=False, reconstruct="gptq", w_bits=4,
                        a_bits=4) for _ in range(2)]
    assert sum(isinstance(m, _QWeighted) for m in runs[0].fake.modules()) == 6
    for m in (m for m in runs[0].fake.modules() if isinstance(m, _QWeighted)):
        scale = 2.0 ** torch.as_tensor(m.w_fmt.frac_array, dtype=torch.float64).reshape(-1, *[1] * (m.weight.dim() - 1))
        codes = m.weight_q.double() * scale
        assert torch.equal(codes, codes.round())
        assert codes.min() >= m.w_fmt.range.lo and codes.max() <= m.w_fmt.range.hi
    for a, b in zip(runs[0].ir.nodes, runs[1].ir.nodes):
        assert a.inputs == b.inputs and a.consts.keys() == b.consts.keys()
        assert all(np.array_equal(a.consts[k], b.consts[k]) for k in a.consts)
    assert any("reconstruct (gptq)" in n for n in runs[0].notes)
    assert_three_executors(runs[0], X[:8])


def test_int8_target_is_exact_too():
    qm = fxq.compile(tiny("residual"), X, "int8", progress=False, reconstruct="gptq", w_bits=4)
    assert_three_executors(qm, X[:8])


def test_cluster_weights_are_refused_by_layer():
    with pytest.raises(UnsupportedOp, match="gptq.*cluster"):
        fxq.compile(tiny("residual"), X, "dfp-cluster", progress=False, reconstruct="gptq")


def test_damp_must_be_non_negative():
    with pytest.raises(CalibrationError, match="damp"):
        fxq.compile(tiny("residual"), X, "shift-int", progress=False, reconstruct={"mode": "gptq", "damp": -1})


# --- inputs="quantized": fitted on the quantized model's inputs, bias solved with the rows -------------

def test_cross_moments_are_the_centred_moments_of_the_patches():
    from passes.reconstruct_gptq import _CrossMoments
    conv = QConv2d.__new__(QConv2d)
    nn.Module.__init__(conv)
    conv.weight = nn.Parameter(torch.zeros(4, 1, 3, 3))
    conv.stride, conv.padding, conv.dilation, conv.groups = (1, 1), (1, 1), (1, 1), 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 4, 4, generator=g) + 0.5
    xq = (x * 2).round() / 2                             # a "quantized" copy: correlated, not equal
    m = _CrossMoments(conv, x, xq)
    for c in range(2):
        def rows(t):
            p = F.pad(t[:, c], (1, 1, 1, 1)).double()
            return torch.stack([p[n, i:i + 3, j:j + 3].reshape(-1) for n in range(5) for i in range(4)
                                for j in range(4)])
        f, q = rows(x), rows(xq)
        assert torch.allclose(m.mean_x[c], f.mean(0)) and torch.allclose(m.mean_q[c], q.mean(0))
        fc, qc = f - f.mean(0), q - q.mean(0)
        assert torch.allclose(m.cov_q[c], qc.T @ qc / len(q))
        assert torch.allclose(m.cov_xq[c], fc.T @ qc / len(q))


def _quantized_inputs(qm, layer_name, x):
    """The input ``layer_name`` gets in the quantized model (every quantizer on)."""
    seen = []
    layer = dict(qm.fake.named_modules())[layer_name]
    h = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        qm.fake(x)
    h.remove()
    return seen[0]


def _float_inputs(qm, layer_name, x):
    set_quantization(qm.fake, False)
    try:
        return _quantized_inputs(qm, layer_name, x)
    finally:
        set_quantization(qm.fake, True)


@pytest.mark.parametrize("name", ["inverted_residual", "residual"])
def test_each_layer_is_fitted_on_the_inputs_the_rounded_model_gives_it(name):
    """Refitting any layer on its inputs in the final quantized model (every upstream layer rounded)
    reproduces its codes and bias: the walk fitted each layer after everything upstream of it."""
    from passes.reconstruct_gptq import _CrossMoments, fit_layer
    opts = {"mode": "gptq", "inputs": "quantized", "samples": 48}
    qm = fxq.compile(tiny(name), X, "shift-int", progress=False, w_bits=4, a_bits=4, bias_correction=None,
                     reconstruct=opts)
    layers = [n for n, m in qm.fake.named_modules() if isinstance(m, _QWeighted)]
    assert len(layers) >= 3
    for name_ in layers:
        layer = dict(qm.fake.named_modules())[name_]
        kept_w, kept_b = layer.weight_q.clone(), layer.bias_q.clone()
        with torch.no_grad():
            m = _CrossMoments(layer, _float_inputs(qm, name_, X), _quantized_inputs(qm, name_, X))
            fit_layer(layer, m, 0.01, qm.target.acc_bits)
        assert torch.equal(layer.weight_q, kept_w), name_
        assert torch.allclose(layer.bias_q, kept_b, rtol=0, atol=1e-9), name_


def test_quantized_inputs_fit_beats_the_float_inputs_fit_on_those_inputs():
    """One layer, coarse inputs: E||W x + b - (Q x̃ + b')||² is smaller when the rows and bias are fitted on x̃."""
    from passes.reconstruct_gptq import _CrossMoments, fit_layer, _Moments, round_layer
    qm = fxq.compile(tiny("residual"), X, "shift-int", progress=False, w_bits=4, a_bits=4, bias_correction=None)
    name_ = [n for n, m in qm.fake.named_modules() if isinstance(m, _QWeighted)][1]
    layer = dict(qm.fake.named_modules())[name_]
    x, xq = _float_inputs(qm, name_, X), _quantized_inputs(qm, name_, X)

    def error():
        with torch.no_grad():
            want = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
            return float(((layer(xq) - want) ** 2).mean())

    with torch.no_grad():
        acc = _Moments(layer)
        acc(layer, (x,), None)
        round_layer(layer, acc.hessian(), 0.01)
        on_float = error()
        fit_layer(layer, _CrossMoments(layer, x, xq), 0.01, qm.target.acc_bits)
        on_quantized = error()
    assert on_quantized < 0.9 * on_float


def test_quantized_inputs_model_is_on_the_grid_and_exact():
    qm = fxq.compile(tiny("inverted_residual"), X, "shift-int", progress=False, w_bits=4, a_bits=4,
                     reconstruct={"mode": "gptq", "inputs": "quantized"})
    assert sum(isinstance(m, _QWeighted) for m in qm.fake.modules()) == 6
    for m in (m for m in qm.fake.modules() if isinstance(m, _QWeighted)):
        scale = 2.0 ** torch.as_tensor(m.w_fmt.frac_array, dtype=torch.float64).reshape(-1, *[1] * (m.weight.dim() - 1))
        codes = m.weight_q.double() * scale
        assert torch.equal(codes, codes.round())
    assert any("quantized input moments" in n for n in qm.notes)
    # the pass solved the biases: compile's "auto" bias correction stays off
    assert not any(n.startswith("bias correction") for n in qm.notes)
    assert_three_executors(qm, X[:8])


def test_inputs_option_is_checked():
    with pytest.raises(CalibrationError, match="inputs.*one of"):
        fxq.compile(tiny("residual"), X, "shift-int", progress=False, reconstruct={"mode": "gptq", "inputs": "fp32"})
    with pytest.raises(CalibrationError, match="inputs.*mode 'gptq' only"):
        fxq.compile(tiny("residual"), X, "shift-int", progress=False, reconstruct={"mode": "rapq", "inputs": "quantized"})


# --- step_search: each row's power of two chosen by the output error its OBQ rounding leaves ----------

@pytest.mark.parametrize("name", ["inverted_residual", "residual"])
def test_step_search_lowers_every_layers_output_error(name):
    """The row's own step is among the candidates, so no layer's error on its float input can rise (the
    searched layers keep the same inputs: the float model's)."""
    kw = {"w_bits": 4, "a_bits": 8, "bias_correction": None, "progress": False}
    plain = fxq.compile(tiny(name), X, "shift-int", reconstruct={"mode": "gptq", "samples": 48}, **kw)
    searched = fxq.compile(tiny(name), X, "shift-int", reconstruct={"mode": "gptq", "samples": 48, "step_search": 1},
                           **kw)
    before, after = _layer_errors(plain, X), _layer_errors(searched, X)
    assert all(after[n] <= before[n] * (1 + 1e-9) + 1e-15 for n in before)
    assert sum(after.values()) < sum(before.values())
    moved = [(a.w_fmt.frac_array - b.w_fmt.frac_array)
             for a, b in zip(_weighted(plain.fake), _weighted(searched.fake))]
    assert any(m.any() for m in moved) and all(np.abs(m).max() <= 1 for m in moved)
    # the lowered graph carries the searched steps and runs bit-exactly
    assert_three_executors(searched, X[:8])


def _weighted(gm):
    return [m for m in gm.modules() if isinstance(m, _QWeighted)]


def test_step_search_with_quantized_inputs_is_exact():
    qm = fxq.compile(tiny("inverted_residual"), X, "shift-int", progress=False, w_bits=4, a_bits=4,
                     reconstruct={"mode": "gptq", "inputs": "quantized", "step_search": 1})
    assert_three_executors(qm, X[:8])


def test_step_search_is_checked():
    with pytest.raises(CalibrationError, match="step_search.*0..4"):
        fxq.compile(tiny("residual"), X, "shift-int", progress=False, reconstruct={"mode": "gptq", "step_search": -1})
    with pytest.raises(CalibrationError, match="step_search.*GPTQ rounding only"):
        fxq.compile(tiny("residual"), X, "shift-int", progress=False, reconstruct={"mode": "rapq", "step_search": 1})


# --- init="gptq": learned rounding (AdaRound/RAPQ) that starts from GPTQ's compensated weights ---------

def _fake(recon, name="inverted_residual"):
    ctx = CompileContext(get_target("shift-int", w_bits=4, a_bits=4), X[:1], [X], progress=False,
                         bias_correction=None, reconstruct=recon)
    return run_passes(trace(tiny(name)), ctx, PIPELINE[: PIPELINE.index(reconstruct) + 1]), ctx


def test_learned_rounding_starts_at_gptqs_codes():
    """With a learning rate too small to move any V across 0, the hardened rounding is the nearest code
    of each compensated value: GPTQ's own result, layer for layer."""
    started, _ = _fake(ReconstructOptions(mode="adaround", init="gptq", iters=1, lr=1e-12, samples=48))
    gptq, _ = _fake(ReconstructOptions(mode="gptq", samples=48))
    pairs = list(zip(_weighted(started), _weighted(gptq)))
    assert pairs and all(torch.equal(a.weight_q, b.weight_q) for a, b in pairs)


def test_codes_start_puts_the_soft_weights_next_to_gptqs_codes_not_at_its_values():
    """init="gptq-codes": each soft weight starts within CODE_INIT_MARGIN steps of GPTQ's code and hardens
    to it; init="gptq" starts the soft weights at the compensated values themselves."""
    from fxq.passes.reconstruct_gptq import round_on_float_inputs, rounded_layers
    from fxq.passes.calibration.relaxed import CODE_INIT_MARGIN, SoftLayer
    ctx = CompileContext(get_target("shift-int", w_bits=4, a_bits=4), X[:1], [X], progress=False,
                         bias_correction=None, reconstruct=ReconstructOptions(mode="adaround", samples=48))
    gm = run_passes(trace(tiny("inverted_residual")), ctx, PIPELINE[: PIPELINE.index(reconstruct)])
    twin = copy.deepcopy(gm)
    with torch.no_grad():
        round_on_float_inputs(twin, ctx, X[:48], rounded_layers(twin))              # GPTQ's codes
        round_on_float_inputs(gm, ctx, X[:48], rounded_layers(gm), updated=True)    # its compensated values
    codes = {id(a): b.weight_q for a, b in zip(_weighted(gm), _weighted(twin))}
    moved = 0
    for m in _weighted(gm):
        step = torch.from_numpy(m.w_fmt.step).float().reshape((-1,) + (1,) * (m.weight_q.dim() - 1))
        at_codes = SoftLayer(m, learn_exponent=False, at_codes=True)
        with torch.no_grad():
            assert torch.equal(at_codes.hard_weight(), codes[id(m)].float())
            gap = ((at_codes.soft_weight() - codes[id(m)]) / step).abs()
            assert float(gap.max()) <= CODE_INIT_MARGIN + 1e-5
            at_values = SoftLayer(m, learn_exponent=False)
            assert torch.equal(at_values.hard_weight(), codes[id(m)].float())
            scaled = m.weight_q / step               # away from the clamps of h(V) and of the code range
            rng = m.w_fmt.range
            inside = ((scaled - torch.floor(scaled) - 0.5).abs() < 0.49) & (scaled > rng.lo) & (scaled < rng.hi)
            assert inside.any() and torch.allclose(at_values.soft_weight()[inside], m.weight_q.float()[inside], atol=1e-5)
            moved += int((((at_values.soft_weight() - codes[id(m)]) / step).abs() > CODE_INIT_MARGIN + 1e-3).sum())
    assert moved > 0                                                    # the two starts differ


def test_learned_rounding_from_gptqs_codes_is_exact_and_says_so():
    recon = {"mode": "adaround", "init": "gptq-codes", "iters": 30, "samples": 48, "batch": 16}
    qm = fxq.compile(tiny("residual"), X, "shift-int", progress=False, w_bits=4, a_bits=4, reconstruct=recon)
    assert any("reconstruct (adaround, from GPTQ's codes)" in n for n in qm.notes)
    assert_three_executors(qm, X[:8])


def test_learned_rounding_from_gptq_improves_on_it_and_stays_exact():
    """Training can move past GPTQ's codes (a block kept with a lower loss than GPTQ's start); a block it
    does not improve is put back at GPTQ's codes."""
    recon = {"mode": "adaround", "init": "gptq", "iters": 150, "samples": 48, "batch": 16}
    _, ctx = _fake(ReconstructOptions(**recon), "residual")
    assert any(h["kept"] and h["loss_after"] < h["loss_before"] for h in ctx.reconstruct_history)
    qm = fxq.compile(tiny("residual"), X, "shift-int", progress=False, w_bits=4, a_bits=4,
                     bias_correction=None, reconstruct=recon)
    assert any("reconstruct (adaround, from GPTQ)" in n for n in qm.notes)
    assert_three_executors(qm, X[:8])


def test_init_is_checked():
    with pytest.raises(CalibrationError, match="init.*one of"):
        fxq.compile(tiny("residual"), X, "shift-int", progress=False, reconstruct={"mode": "adaround", "init": "x"})
    with pytest.raises(CalibrationError, match="init.*learned modes"):
        fxq.compile(tiny("residual"), X, "shift-int", progress=False, reconstruct={"mode": "gptq", "init": "gptq"})
    with pytest.raises(CalibrationError, match="init='gptq-codes' applies to mode 'adaround' only"):
        fxq.compile(tiny("residual"), X, "shift-int", progress=False, reconstruct={"mode": "rapq", "init": "gptq-codes"})
