"""fold_bn: each BatchNorm folded into the conv/linear before it, its statistics kept in ``meta[BN_STATS]``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import PASS_X as X, TINY_MODELS, run_until, tiny
from fxq import meta
from fxq.passes import fold_bn


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_fold_bn_is_numerically_equal_and_keeps_statistics(name):
    m = tiny(name)
    gm, _ = run_until(m, fold_bn)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(X), m(X), rtol=1e-4, atol=1e-4)
    bn_count = sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    stats = [n.meta[meta.BN_STATS] for n in gm.graph.nodes if meta.BN_STATS in n.meta]
    assert len(stats) == bn_count
    first_bn = next((mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)), None)
    assert first_bn is None or any(np.allclose(s.mean, first_bn.running_mean.numpy()) for s in stats)


def test_fold_bn_refuses_a_lone_batchnorm():
    from fxq.errors import UnsupportedOp
    m = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3)).eval()
    with pytest.raises(UnsupportedOp, match="BatchNorm is folded into the conv or linear right before it"):
        run_until(m, fold_bn)
