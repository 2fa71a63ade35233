"""insert_fake_quant: the annotated graph becomes the fake-quant model, whose values sit on their grids."""
from __future__ import annotations

import torch

from conftest import PASS_X as X, run_until, tiny
from fxq import meta
from fxq.passes import PIPELINE


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
