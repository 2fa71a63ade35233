"""Tiny named models that every pass and exactness test runs over, the pass runner the tests under
tests/passes/ share, and the three-executor check."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxq.context import CompileContext
from fxq.evaluate import executor_codes
from fxq.passes import PIPELINE
from fxq.pipeline import run_passes
from fxq.targets import get_target
from fxq.trace import trace

# Every pipeline run in the tests holds each pass to its declared requires/writes (fxq.pipeline).
os.environ.setdefault("FXQ_CHECK_PASSES", "1")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics so folding and data-free formats are exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return model.eval()


def cbr(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act())


class Residual(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = cbr(1, c)
        self.a = cbr(c, c)
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 1, 2, bias=False), nn.BatchNorm2d(2 * c))
        self.c = cbr(c, 2 * c, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.b(self.a(x)) + x)
        x = torch.relu(self.c(x) + self.down(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class Concat(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.stem = cbr(1, c)
        self.left = cbr(c, c, k=1)
        self.right = cbr(c, c, k=3)
        self.mp = nn.MaxPool2d(3, 2, padding=1)
        self.fc = nn.Linear(2 * c * 7 * 7, 10)

    def forward(self, x):
        x = self.mp(self.stem(x))
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(x.view(x.size(0), -1))


class InvertedResidual(nn.Module):
    def __init__(self, c=8, e=3):
        super().__init__()
        self.stem = cbr(1, c, act=nn.ReLU6)
        self.expand = cbr(c, c * e, k=1, act=nn.ReLU6)
        self.dw = cbr(c * e, c * e, groups=c * e, act=nn.ReLU6)
        self.project = nn.Sequential(nn.Conv2d(c * e, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Sequential(nn.Conv2d(c, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Hardtanh(0.0, 6.0))
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        x = self.head(x).mean((2, 3))
        return self.fc(self.drop(x))


class PoolsAndPads(nn.Module):
    """Strided/dilated convs, zero padding, a 3x3 average pool folded into a conv, a 2x2 one shifted."""

    def __init__(self, c=4):
        super().__init__()
        self.pad = nn.ZeroPad2d((1, 2, 0, 1))
        self.c1 = nn.Conv2d(1, c, 3, stride=2, dilation=2, padding=1)
        self.avg3 = nn.AvgPool2d(3, stride=1, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.avg2 = nn.AvgPool2d(2)
        self.ident = nn.Identity()
        self.fc = nn.Linear(c * 7 * 7, 10)

    def forward(self, x):
        x = F.relu(self.c1(self.pad(x)))
        x = F.relu6(self.c2(self.avg3(x)))
        x = self.ident(self.avg2(x))
        return self.fc(torch.flatten(x, 1))


TINY_MODELS = {"residual": Residual, "concat": Concat, "inverted_residual": InvertedResidual,
               "pools_and_pads": PoolsAndPads}


def tiny(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(TINY_MODELS[name](), seed)


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    return request.param, tiny(request.param)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(24, 1, 28, 28, generator=g)


# The pass tests' calibration batch (tests/passes/test_<pass>.py import it as X).
PASS_X = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def pass_ctx(calib=True, **kw):
    """A shift-int CompileContext (``kw`` overrides target fields), calibrated on PASS_X unless not ``calib``."""
    return CompileContext(get_target("shift-int", **kw), PASS_X[:1], [PASS_X] if calib else None, progress=False)


def run_until(model, last, c=None):
    """Trace a copy of ``model`` and run PIPELINE up to and including the pass ``last``: (gm, ctx)."""
    c = c or pass_ctx()
    passes = PIPELINE[: PIPELINE.index(last) + 1]
    return run_passes(trace(copy.deepcopy(model)), c, passes), c


def three_executors(qm, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Output codes of the reference backend, the float64 fake-quant model and ONNX Runtime."""
    return executor_codes(qm, x, batch=len(x))[0]


def assert_three_executors(qm, x: torch.Tensor) -> None:
    codes = three_executors(qm, x)
    ref = codes["reference"]
    for name, c in codes.items():
        mismatch = np.argwhere(c != ref)
        assert mismatch.size == 0, f"{name} differs from the reference at {len(mismatch)} positions, first {mismatch[:3].tolist()}"
