"""token_masks: the validity mask of token ids becomes one marked comparison, a key-masked softmax module
and a masked mean; any other use of the ids is refused by node."""
from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

import fxq
from conftest import run_until
from fxq import islands, meta
from fxq.context import CompileContext
from fxq.errors import UnsupportedOp
from fxq.passes import token_masks
from fxq.targets import get_target

IDS = torch.randint(0, 30, (6, 5), generator=torch.Generator().manual_seed(0))
IDS[:3, 2:] = 0                          # padding at the end of half of the sentences


def _ctx(example=IDS):
    return CompileContext(get_target("shift-int"), example[:1], [example], progress=False)


class MaskedEncoder(nn.Module):
    """The two uses of ``ids != 0``: an additive key mask before a softmax and a mean over valid tokens."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(30, 8)

    def forward(self, ids):
        valid = ids.ne(0)
        x = self.tok(ids)
        bias = (~valid).float()[:, None, None, :] * -1e4
        attn = torch.softmax((x @ x.transpose(-2, -1))[:, None] + bias, dim=-1)
        y = (attn[:, 0] @ x)
        m = valid.unsqueeze(-1).float()
        return (y * m).sum(1) / m.sum(1).clamp(min=1)


def test_the_mask_uses_become_a_key_masked_softmax_and_a_masked_mean():
    torch.manual_seed(0)
    model = MaskedEncoder().eval()
    gm, _ = run_until(model, token_masks, _ctx())
    nodes = list(gm.graph.nodes)
    marked = [n for n in nodes if n.meta.get(meta.KIND) == "token_mask"]
    assert len(marked) == 1 and marked[0].op == "call_function" and marked[0].target is operator.ne
    (valid,) = marked
    softmaxes = [n for n in nodes if n.op == "call_module"
                 and isinstance(gm.get_submodule(n.target), islands.TokenMaskedSoftmax)]
    assert len(softmaxes) == 1 and softmaxes[0].args[1] is valid
    module = gm.get_submodule(softmaxes[0].target)
    assert (module.on_valid, module.on_invalid) == (0.0, -1e4)
    means = [n for n in nodes if n.op == "call_function" and n.target is islands.masked_mean]
    assert len(means) == 1 and means[0].args[1] is valid
    assert not any(n.op == "call_function" and n.target is torch.softmax for n in nodes)
    assert set(valid.users) == {softmaxes[0], means[0]}, "the mask arithmetic is gone"
    with torch.no_grad():
        torch.testing.assert_close(gm(IDS), model(IDS))


def test_float_inputs_are_left_alone():
    model = nn.Sequential(nn.Linear(5, 3)).eval()
    x = torch.randn(4, 5)
    gm, _ = run_until(model, token_masks, _ctx(x))
    assert not any(n.meta.get(meta.KIND) == "token_mask" for n in gm.graph.nodes)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]


def test_a_second_comparison_of_the_ids_is_refused_by_node():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(30, 8)

        def forward(self, ids):
            m = (ids != 0).unsqueeze(-1).float() * (ids != 1).unsqueeze(-1).float()
            return (self.tok(ids) * m).sum(1) / m.sum(1).clamp(min=1)

    with pytest.raises(UnsupportedOp, match=r"ne_1.*second comparison of the token ids"):
        run_until(Two().eval(), token_masks, _ctx())


# moved from tests/test_text_encoder.py
def test_other_uses_of_token_ids_are_refused_with_the_node():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(50, 8)

        def forward(self, ids):
            return self.tok(ids) * (ids > 3).float().unsqueeze(-1)

    with pytest.raises(UnsupportedOp, match=r"node 'mul'.*computed from the token ids"):
        fxq.compile(Bad().eval(), torch.randint(0, 50, (8, 6)), progress=False)
