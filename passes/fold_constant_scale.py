"""fold_constant_scale: a multiplication by a constant moves into the conv/linear that produced its input.

Attention scales its scores, ``(q @ k^T) * d**-0.5``; a shift-only target has no multiplier for that,
but the product is linear in q, so the factor can scale q's linear layer (weights and bias) instead.
The walk goes up through ops that commute with any constant factor (reshape, flatten, permute, select,
the left operand of a matmul), each of whose outputs feeds only the next one.

Reads: ``meta[KIND]``. Writes: the producing layer's weight and bias; removes every ``mul_const`` node.
Raises UnsupportedOp naming the node when no such layer exists.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxq import meta
from fxq.context import CompileContext
from fxq.errors import UnsupportedOp, describe_node

_LINEAR_OPS = frozenset({"reshape", "flatten", "permute", "select", "matmul"})


def _producer(node: fx.Node) -> fx.Node | None:
    """The conv/linear whose output reaches ``node`` only through factor-commuting ops, else None."""
    x = node.args[0]
    while len(x.users) == 1:
        kind = x.meta.get(meta.KIND)
        if kind in meta.WEIGHTED:
            return x
        if kind not in _LINEAR_OPS:
            return None
        x = x.args[0]
    return None


def fold_constant_scale(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.meta.get(meta.KIND) != "mul_const":
            continue
        c = float(node.args[1])
        layer = _producer(node)
        if layer is None:
            raise UnsupportedOp(f"{describe_node(node)}: multiplication by the constant {c:g} has no conv/linear "
                                f"above it to fold into (only reshape/permute/select/matmul in between, each used "
                                f"once); a shift-only target cannot multiply. Fold the factor into a layer's weights")
        m = modules[layer.target]
        with torch.no_grad():
            m.weight.mul_(c)
            if m.bias is not None:
                m.bias.mul_(c)
        ctx.note(f"{node.name}: the factor {c:g} was folded into {layer.target}'s weights and bias")
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    return gm
