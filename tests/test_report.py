"""qm.report(sensitivity=True): the output SQNR with one quantizer on, checked against a direct computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import fxq
from fxq.fakequant import set_quantization


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 28 * 28, 10)).eval()


def _output_row(qm, rep):
    return next(r for r in rep.rows if r["layer"] == qm.ir.output_codes().name)


def test_output_row_alone_is_the_rounding_of_the_float_output(images):
    """Only the logits' codes on: the output error is exactly the rounding of the folded float model's output."""
    qm = fxq.compile(_net(), images[:16], progress=False)
    rep = qm.report(images, sensitivity=True, progress=False)
    gm = qm.fake
    set_quantization(gm, False)
    with torch.no_grad():
        ref = gm.double()(images.double()).numpy()
    set_quantization(gm, True)
    gm.float()
    t = qm.ir.output_codes().out
    q = np.clip(np.rint(ref * 2.0**t.frac), t.lo, t.hi) * 2.0**-t.frac
    expected = 10 * math.log10((ref ** 2).sum() / ((ref - q) ** 2).sum())
    row = _output_row(qm, rep)
    assert float(row["act alone dB"]) == pytest.approx(expected, abs=0.051)
    assert "act alone dB" in str(rep) and "w alone dB" in str(rep)


def test_wider_codes_read_as_less_sensitive(images):
    narrow = fxq.compile(_net(), images[:16], progress=False)
    wide = fxq.compile(_net(), images[:16], out_bits=16, progress=False)
    a = float(_output_row(narrow, narrow.report(images, sensitivity=True, progress=False))["act alone dB"])
    b = float(_output_row(wide, wide.report(images, sensitivity=True, progress=False))["act alone dB"])
    assert b > a + 30          # 8 more bits: ~48 dB less rounding noise


def test_weights_column_names_the_layer_and_the_model_stays_quantized(images):
    qm = fxq.compile(_net(), images[:16], progress=False)
    before = qm(images)
    rep = qm.report(images, sensitivity=True, progress=False)
    conv_rows = [r for r in rep.rows if r["op"] in ("conv2d_int", "linear_int")]
    assert len(conv_rows) == 2 and all(r["w alone dB"] != "-" for r in conv_rows)
    assert len(rep.rows) > len(conv_rows)
    assert all(r["w alone dB"] == "-" for r in rep.rows if r not in conv_rows)
    assert torch.equal(qm(images), before)         # every quantizer is back on


def test_sensitivity_needs_inputs(images):
    qm = fxq.compile(_net(), images[:16], progress=False)
    with pytest.raises(ValueError, match="needs x"):
        qm.report(sensitivity=True)
