"""fold_constant_scale: a product with a constant moves into the conv/linear above it; refused without one."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxq
from conftest import run_until
from fxq import meta
from fxq.context import CompileContext
from fxq.errors import UnsupportedOp
from fxq.passes import PIPELINE, fold_constant_scale
from fxq.targets import get_target
from fxq.zoo.vit import ViT

X = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(0))


def _ctx():
    return CompileContext(get_target("shift-int"), X[:1], [X], progress=False)


class Scores(nn.Module):
    """Attention-like scores scaled by a constant: (q(x) @ k(x)^T) * 0.25."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return (self.q(x) @ self.k(x).transpose(-2, -1)) * 0.25


def test_the_factor_moves_into_the_left_operands_linear():
    torch.manual_seed(0)
    model = Scores().eval()
    before, _ = run_until(model, PIPELINE[PIPELINE.index(fold_constant_scale) - 1], _ctx())
    assert [n.meta[meta.KIND] for n in before.graph.nodes].count("mul_const") == 1
    gm, c = run_until(model, fold_constant_scale, _ctx())
    kinds = [n.meta[meta.KIND] for n in gm.graph.nodes]
    assert "mul_const" not in kinds and kinds.count("matmul") == 1
    q, k = gm.get_submodule("q"), gm.get_submodule("k")
    torch.testing.assert_close(q.weight, model.q.weight * 0.25)
    torch.testing.assert_close(q.bias, model.q.bias * 0.25)
    torch.testing.assert_close(k.weight, model.k.weight)                    # only one side takes the factor
    assert any("0.25 was folded into q" in n for n in c.notes)
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))


def test_a_factor_without_a_layer_above_it_is_refused_by_node():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x * 0.5)

    with pytest.raises(UnsupportedOp, match=r"mul.*constant 0.5 has no conv/linear above it"):
        run_until(Bare().eval(), fold_constant_scale, _ctx())


def _tiny_vit():
    torch.manual_seed(1)
    return ViT(dim=16, depth=1, heads=2, mlp_ratio=2, patch=7).eval()


# moved from tests/test_transformer.py
def test_vit_float_model_is_unchanged_by_the_folded_attention_scale():
    """fold_constant_scale moves d**-0.5 into q's weights: with quantization off the model is the original."""
    m = _tiny_vit()
    qm = fxq.compile(m, torch.randn(16, 1, 28, 28), float_islands="all", progress=False)
    assert any("folded into blocks.0.attn.q" in n for n in qm.notes)
    x = torch.randn(4, 1, 28, 28)
    from fxq.fakequant import set_quantization
    set_quantization(qm.fake, False)
    try:
        torch.testing.assert_close(qm.fake(x), m(x), atol=2e-5, rtol=1e-4)
    finally:
        set_quantization(qm.fake, True)
