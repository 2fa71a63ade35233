"""propagate_shapes: static shapes of the example batch, for reshapes, pools and the IR's types.

Reads: ``ctx.example_input``. Writes: ``meta[SHAPE]`` (a tuple, batch dim first) on every tensor node.
"""
from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from fxq import meta
from fxq.context import CompileContext


def propagate_shapes(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    ShapeProp(gm).propagate(ctx.example_input)
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            node.meta[meta.SHAPE] = tuple(tm.shape)
    return gm
