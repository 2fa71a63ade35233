"""canonicalize: one spelling per op, so later passes read ``meta[KIND]``; numerics unchanged."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from conftest import PASS_X as X, run_until, tiny
from fxq import meta
from fxq.passes import canonicalize


class Spellings(nn.Module):
    """The same ops written every way canonicalize must unify."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.relu6 = nn.ReLU6()

    def forward(self, x):
        x = self.conv(x)
        a = F.relu(x) + torch.relu(x)
        b = torch.add(self.relu(x), x.relu())
        c = self.relu6(a) + F.hardtanh(b, 0.0, 6.0) + torch.clamp(a, 0, 6) + F.relu6(b)
        d = torch.cat([c, c], 1)
        e = torch.concat([d, d], dim=-3)
        return e.view(e.size(0), -1)


def test_canonicalize_one_spelling_per_op():
    model = Spellings().eval()
    gm, _ = run_until(model, canonicalize)
    kinds = [n.meta[meta.KIND] for n in gm.graph.nodes]
    assert kinds.count("relu") == 4 and kinds.count("clamp") == 4 and kinds.count("add") == 5
    assert kinds.count("cat") == 2 and kinds.count("flatten") == 1
    targets = {n.meta[meta.KIND]: n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert targets["relu"] is torch.relu and targets["add"] is operator.add and targets["clamp"] is torch.clamp
    assert all(n.op != "call_method" for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))


def test_canonicalize_keeps_numerics_and_removes_identity_dropout():
    m = tiny("inverted_residual")
    gm, _ = run_until(m, canonicalize)
    assert not any(isinstance(mod, (nn.Dropout, nn.Identity)) for mod in gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(X), m(X))
