"""bias_correction: what it cancels, what it leaves alone, and that the integer graph stays exact."""
from __future__ import annotations

import copy

import pytest
import torch

import fxq
from conftest import assert_three_executors, tiny
from fxq.context import CompileContext
from fxq.errors import CalibrationError
from fxq.fakequant import _QWeighted, set_quantization
from fxq.formats import step_of
from fxq.passes import PIPELINE, bias_correction
from fxq.pipeline import run_passes
from fxq.targets import get_target
from fxq.trace import trace

X = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(3))


def fake_model(model, mode, **target):
    """The fake-quant GraphModule after every pass up to and including bias_correction."""
    c = CompileContext(get_target("shift-int", **target), X[:1], [X], progress=False, bias_correction=mode,
                       bias_correction_samples=0)
    return run_passes(trace(copy.deepcopy(model)), c, PIPELINE[: PIPELINE.index(bias_correction) + 1]), c


class _Inputs(torch.fx.Interpreter):
    """Records the (quantized) input each weighted layer sees."""

    def __init__(self, gm):
        super().__init__(gm)
        self.seen = {}

    def call_module(self, target, args, kwargs):
        if isinstance(self.module.get_submodule(target), _QWeighted):
            self.seen[target] = args[0]
        return super().call_module(target, args, kwargs)


def own_rounding_bias(gm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: the per-channel mean of (quantized - float-weights) output on its quantized input, and
    the layer's accumulator step."""
    rec = _Inputs(gm)
    with torch.no_grad():
        rec.run(X)
        out = {}
        for name, x in rec.seen.items():
            layer = gm.get_submodule(name)
            q = layer(x)
            layer.enabled = False
            f = layer(x)
            layer.enabled = True
            dims = [0] + list(range(2, q.dim()))
            step = torch.from_numpy(step_of(layer.bias_frac.numpy(), layer.acc_mant))
            out[name] = ((q - f).double().mean(dims), step)
    return out


@pytest.mark.parametrize("name", ["residual", "inverted_residual"])
def test_weights_mode_cancels_each_layers_rounding_bias(name):
    model = tiny(name)
    before = own_rounding_bias(fake_model(model, None, w_bits=4)[0])
    after = own_rounding_bias(fake_model(model, "weights", w_bits=4)[0])
    worst_before = max(float((m.abs() / s).max()) for m, s in before.values())
    assert worst_before > 1.0, "4-bit weights should leave a mean error above one accumulator step"
    assert after.keys() == before.keys()
    for layer, (mean, step) in after.items():
        # what is left is the bias code's own rounding: at most half an accumulator step (+ float32 noise)
        assert bool((mean.abs() <= 0.5 * step + 1e-4 * (1 + mean.abs())).all()), (layer, mean, step)


def test_float_model_is_untouched_and_only_bias_q_moves():
    model = tiny("residual")
    gm, _ = fake_model(model, "empirical", w_bits=4)
    plain, _ = fake_model(model, None, w_bits=4)
    moved = 0
    for (name, a), (_, b) in zip(gm.named_modules(), plain.named_modules()):
        if isinstance(a, _QWeighted):
            assert torch.equal(a.bias, b.bias), name            # the float bias stays
            assert torch.equal(a.weight, b.weight), name
            moved += int(not torch.equal(a.bias_q, b.bias_q))
    assert moved > 0
    set_quantization(gm, False)
    with torch.no_grad():
        ref = trace(copy.deepcopy(model))(X[:4])
        assert torch.allclose(gm(X[:4]), ref, atol=1e-4)         # quantization off: the float model


def test_off_leaves_bias_q_equal_to_bias():
    gm, c = fake_model(tiny("residual"), None)
    assert sum(isinstance(m, _QWeighted) for m in gm.modules()) == 6
    for m in gm.modules():
        if isinstance(m, _QWeighted):
            assert torch.equal(m.bias_q, m.bias)
    assert not any("bias correction" in n for n in c.notes)


@pytest.mark.parametrize("target,overrides", [("shift-int", {"w_bits": 4}), ("int8", {}),
                                              ("dfp-cluster", {"w_bits": 4})])
@pytest.mark.parametrize("mode", ["weights", "empirical", "checked"])
def test_corrected_models_stay_three_executor_exact(target, overrides, mode):
    qm = fxq.compile(tiny("inverted_residual"), X, target=target, progress=False, bias_correction=mode,
                     **overrides)
    assert any(f"bias correction ({mode})" in n for n in qm.notes)
    assert_three_executors(qm, X[:16])


def _output_error(gm) -> float:
    with torch.no_grad():
        set_quantization(gm, False)
        ref = gm(X)
        set_quantization(gm, True)
        return float(((gm(X) - ref) ** 2).sum())


@pytest.mark.parametrize("w_bits", [2, 4])
def test_checked_keeps_the_empirical_correction_only_when_the_output_gets_closer(w_bits):
    none, _ = fake_model(tiny("inverted_residual"), None, w_bits=w_bits, a_bits=4)
    emp, _ = fake_model(tiny("inverted_residual"), "empirical", w_bits=w_bits, a_bits=4)
    checked, c = fake_model(tiny("inverted_residual"), "checked", w_bits=w_bits, a_bits=4)
    best = emp if _output_error(emp) < _output_error(none) else none
    assert sum(isinstance(m, _QWeighted) for m in checked.modules()) == 6
    for name, m in checked.named_modules():
        if isinstance(m, _QWeighted):
            assert torch.equal(m.bias_q, best.get_submodule(name).bias_q), name
    assert any("bias correction (checked): the empirical correction is " + ("kept" if best is emp else "undone") in n
               for n in c.notes)


def test_checked_puts_every_bias_back_when_the_correction_hurts(monkeypatch):
    import importlib
    bc = importlib.import_module("fxq.passes.bias_correction")      # the module, not the pass it exports

    def harmful(gm, ctx, mode):                      # a "correction" that moves every output far away
        for m in gm.modules():
            if isinstance(m, _QWeighted):
                m.bias_q.add_(10.0)
        return gm
    monkeypatch.setattr(bc, "_correct", harmful)
    gm, c = fake_model(tiny("residual"), "checked", w_bits=4)
    assert sum(isinstance(m, _QWeighted) for m in gm.modules()) == 6
    for m in gm.modules():
        if isinstance(m, _QWeighted):
            assert torch.equal(m.bias_q, m.bias)      # as insert_fake_quant left them
    assert any("is undone" in n for n in c.notes)


@pytest.mark.parametrize("reconstruct,mode", [(None, "weights"), ({"iters": 4, "samples": 16}, "checked")])
def test_auto_is_weights_alone_and_checked_after_reconstruct(reconstruct, mode):
    for value in ("auto", True):
        qm = fxq.compile(tiny("residual"), X[:16], "shift-int", progress=False, bias_correction=value,
                         reconstruct=reconstruct)
        assert any(n.startswith(f"bias correction ({mode})") for n in qm.notes), qm.notes


def test_reduces_output_error_at_low_bits():
    model = tiny("inverted_residual")
    with torch.no_grad():
        ref = model(X)
    errs = {}
    for mode in (None, "weights"):
        qm = fxq.compile(model, X, target="shift-int", progress=False, bias_correction=mode, w_bits=4, a_bits=8)
        with torch.no_grad():
            errs[mode] = float(((qm(X) - ref) ** 2).mean())
    assert errs["weights"] < errs[None], errs


def test_data_free_compile_skips_it():
    qm = fxq.compile(tiny("residual"), None, input_shape=(1, 1, 28, 28), progress=False)
    assert not any("bias correction" in n for n in qm.notes)


@pytest.mark.parametrize("kwargs,field", [({"bias_correction": "mean"}, "bias_correction='mean'"),
                                          ({"bias_correction_samples": -1}, "bias_correction_samples=-1"),
                                          ({"bias_correction_samples": 2.5}, "bias_correction_samples=2.5")])
def test_bad_options_are_named(kwargs, field):
    with pytest.raises(CalibrationError, match=field.replace("(", r"\(")):
        fxq.compile(tiny("residual"), X, progress=False, **kwargs)
