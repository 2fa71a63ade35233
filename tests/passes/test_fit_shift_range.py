"""fit_shift_range: a conv channel with near-zero weights used to give a requant shift past MAX_SHIFT, and
the verifier refused the whole model; now its weight step is coarsened and the model lowers exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxq
from conftest import assert_three_executors
from fxq.ir import Op
from fxq.verify import MAX_SHIFT


def _near_zero_channel_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        m[0].weight[1] *= 1e-9            # a filter that all but died in training, with no bias to cap it
        m[0].bias[1] = 0.0
    return m


def _shifts(qm) -> np.ndarray:
    return np.concatenate([np.atleast_1d(n.attrs.shift) for n in qm.ir.nodes if n.op is Op.REQUANT])


@pytest.mark.parametrize("target", ["shift-int", "fixed-point8"])
def test_a_near_zero_channel_gets_a_shift_in_range_and_stays_exact(target):
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    qm = fxq.compile(_near_zero_channel_model(), x, target, progress=False)
    assert np.abs(_shifts(qm)).max() <= MAX_SHIFT
    assert any(n.startswith("_0: 1 output channel(s) with near-zero weights") for n in qm.notes)
    assert_three_executors(qm, x[:8])


def test_models_without_such_channels_are_left_alone():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    qm = fxq.compile(m, torch.randn(32, 3, 8, 8), "shift-int", progress=False)
    assert not any("requant shift stays within" in n for n in qm.notes)
