"""fold_pool_divisor: make every average pool divide by a power of two.

An average over a window of ``area`` values divides by ``area``; a shift-only target can only divide
by 2**k. The pool becomes ``sum / 2**k`` with k = ceil(log2(area)), and the leftover factor
2**k / area is folded into the weights of the conv or linear that consumes the pool (through
flatten, reshape, ReLU, max-pool or zero padding, which all commute with a positive scale).

Reads: ``meta[KIND]``, ``meta[SHAPE]``. Writes: the pool's divisor (its ``divisor_override`` argument)
and ``meta[POOL_GAIN]`` on the consuming layer, whose weights are scaled. Raises UnsupportedOp, naming
the pool, when the area is not a power of two and no such consumer exists.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxq import meta
from fxq.context import CompileContext
from fxq.errors import UnsupportedOp, describe_node
from fxq.walk import weighted_consumers

_SCALE_COMMUTING = frozenset({"flatten", "reshape", "relu", "maxpool", "pad"})


def fold_pool_divisor(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.meta.get(meta.KIND) != "avgpool":
            continue
        x, kernel, stride, padding, ceil_mode, count_pad = node.args[:6]
        if ceil_mode:
            raise UnsupportedOp(f"{describe_node(node)}: avg_pool2d(ceil_mode=True) has windows of varying "
                                f"size, so no single shift divides them")
        if any(padding) and not count_pad:
            raise UnsupportedOp(f"{describe_node(node)}: avg_pool2d(count_include_pad=False) with padding "
                                f"divides border windows by other counts than the rest")
        area = kernel[0] * kernel[1]
        k = math.ceil(math.log2(area))
        if 2**k != area:
            layers = weighted_consumers(node, _SCALE_COMMUTING)
            layer = layers[0] if layers is not None and len(layers) == 1 else None
            if layer is None:
                raise UnsupportedOp(
                    f"{describe_node(node)}: this average pool divides by {kernel[0]}x{kernel[1]}={area}, which is "
                    f"not a power of two; a shift-only target can fold the factor only into a conv or linear "
                    f"that consumes the pool directly (through flatten/reshape/ReLU/max-pool/zero-pad), "
                    f"and none does here. Use a power-of-two window or add such a layer.")
            gain = 2**k / area
            with torch.no_grad():
                modules[layer.target].weight.mul_(gain)
            layer.meta[meta.POOL_GAIN] = layer.meta.get(meta.POOL_GAIN, 1.0) * gain
        node.args = (x, kernel, stride, padding, False, True, 2**k)
        node.target = F.avg_pool2d
    return gm
