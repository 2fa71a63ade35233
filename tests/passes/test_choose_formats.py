"""choose_formats: ``meta[ACT_FMT]`` on every qpoint and ``meta[W_FMT]`` on every conv/linear."""
from __future__ import annotations

import numpy as np

from conftest import pass_ctx as ctx, run_until, tiny
from fxq import meta
from fxq.passes import choose_formats


def test_choose_formats_relu6_uses_the_code_range():
    """A ReLU6 output that reaches 6 must get a step of 2**-5 (codes up to 192), not a coarse one."""
    gm, _ = run_until(tiny("inverted_residual"), choose_formats)
    clamps = [n for n in gm.graph.nodes if n.meta[meta.KIND] == "clamp" and meta.ACT_FMT in n.meta]
    assert clamps
    for n in clamps:
        obs, fmt = n.meta[meta.OBSERVER], n.meta[meta.ACT_FMT]
        top = min(obs.max, 6.0)
        assert fmt.frac >= np.floor(np.log2(255 / top)), (n.name, fmt, top)      # no coarser than no-clip
        assert fmt.range.hi >= 128 or fmt.range.hi >= top * 2.0 ** fmt.frac, (n.name, fmt)


def test_choose_formats_per_tensor_weights():
    gm, _ = run_until(tiny("residual"), choose_formats, ctx(w_granularity="tensor"))
    assert sum(meta.W_FMT in n.meta for n in gm.graph.nodes) == 6
    assert all(len(set(n.meta[meta.W_FMT].frac)) == 1 for n in gm.graph.nodes if meta.W_FMT in n.meta)
