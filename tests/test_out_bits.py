"""out_bits: the network's output codes widen alone; every layer inside keeps its bits; still exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxq
from fxq.targets import TargetError
from fxq.ir import Op
from conftest import assert_three_executors


def _net(last_relu: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 28 * 28, 10)]
    return nn.Sequential(*layers, *([nn.ReLU()] if last_relu else [])).eval()


@pytest.mark.parametrize("last_relu, dtype", [(False, "int16"), (True, "uint16")])
def test_output_codes_widen_and_stay_exact(images, last_relu, dtype):
    model = _net(last_relu)
    narrow = fxq.compile(model, images[:16], progress=False)
    wide = fxq.compile(model, images[:16], out_bits=16, progress=False)
    assert narrow.ir.output_codes().out.dtype == dtype.replace("16", "8")
    assert wide.ir.output_codes().out.dtype == dtype
    # only the output moved: every other quantization point keeps its dtype and fractional length
    before = {n.name: (n.out.dtype, n.out.frac) for n in narrow.ir.nodes if n.op is Op.REQUANT}
    after = {n.name: (n.out.dtype, n.out.frac) for n in wide.ir.nodes if n.op is Op.REQUANT}
    out = wide.ir.output_codes().name
    assert len(before) == len(after) == 2 and out in after      # the conv's requant and the output's
    assert {k: v for k, v in before.items() if k != out} == {k: v for k, v in after.items() if k != out}
    # 8 more bits over the same range: the step is 2**8 finer
    assert wide.ir.output_codes().out.frac == narrow.ir.output_codes().out.frac + 8
    assert_three_executors(wide, images)
    with torch.no_grad():
        ref = model(images).numpy()
    err = lambda qm: float(np.abs(qm(images).numpy() - ref).max())
    assert err(wide) < err(narrow)


def test_out_bits_overrides_edge_bits(images):
    qm = fxq.compile(_net(False), images[:16], a_bits=4, edge_a_bits=8, out_bits=12, progress=False)
    assert qm.ir.output_codes().out.dtype == "int16"
    quantize = next(n for n in qm.ir.nodes if n.op is Op.QUANTIZE)
    assert quantize.out.dtype == "int8"              # the input keeps edge_a_bits


@pytest.mark.parametrize("bad", [1, 17, 8.0, True, "16"])
def test_out_bits_must_be_a_bit_count(bad):
    with pytest.raises(TargetError, match=r"out_bits=.*must be None or an integer in 2\.\.16"):
        fxq.get_target("shift-int").with_overrides(out_bits=bad)


def test_twin_uniform_output_keeps_its_codes_and_says_so(images):
    """A softmax the network returns keeps twin-uniform codes (out_bits does not widen them): a note says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10), nn.Softmax(dim=-1)).eval()
    qm = fxq.compile(model, images[:16], out_bits=16, progress=False)
    assert qm.ir.output_codes().op is Op.TWIN_EXPAND          # twin codes, expanded to one fine step at the end
    assert any("do not widen twin codes" in n for n in qm.notes)
