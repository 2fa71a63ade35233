"""insert_fake_quant: the annotated graph becomes the fake-quant model, whose values sit on their grids."""
from __future__ import annotations

import torch

from conftest import PASS_X as X, run_until, tiny
from fxq import meta
from fxq.fakequant import FakeQuant, QConv2d, QLinear, set_quantization
from fxq.passes import PIPELINE, insert_fake_quant


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
    assert len(values) == 5, sorted(values)     # input, the stem's and both branches' ReLUs, fc
    for name, (v, fmt) in values.items():
        codes = v * 2.0 ** fmt.frac
        assert torch.equal(codes, torch.round(codes)), name
        assert codes.min() >= fmt.range.lo and codes.max() <= fmt.range.hi


def test_every_qpoint_is_read_through_its_fake_quant_and_every_layer_rounds_its_weights():
    model = tiny("residual")
    gm, _ = run_until(model, insert_fake_quant)
    nodes = list(gm.graph.nodes)
    quantized = [n for n in nodes if n.meta.get(meta.ROLE) in ("qpoint", "input")]
    fqs = [n for n in nodes if n.meta.get(meta.KIND) == "fake_quant"]
    assert len(quantized) == len(fqs) == 10      # input, 5 ReLUs, the 2 convs feeding adds directly, pool, fc
    for fq in fqs:
        (src,) = fq.args
        assert src in quantized and set(src.users) == {fq}, f"{src.name} is read around its FakeQuant"
        assert isinstance(gm.get_submodule(fq.target), FakeQuant) and meta.ACT_FMT in fq.meta
    layers = [n for n in nodes if n.meta.get(meta.KIND) in meta.WEIGHTED]
    assert len(layers) == 6 and all(isinstance(gm.get_submodule(n.target), (QConv2d, QLinear)) for n in layers)
    set_quantization(gm, False)                       # quantization off: the folded float model
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X), rtol=1e-4, atol=1e-4)
