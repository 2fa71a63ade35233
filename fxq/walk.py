"""Graph walks that several passes share: where a tensor's format comes from, and its sign."""
from __future__ import annotations

import torch.fx as fx

from . import meta


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensor inputs of a canonical node (cat's first argument is a tuple of them)."""
    if node.meta.get(meta.KIND) == "cat":
        return list(node.args[0])
    return [a for a in node.args if isinstance(a, fx.Node)][: 2 if node.meta.get(meta.KIND) in meta.BINARY else 1]


def format_source(node: fx.Node) -> fx.Node:
    """The quantization point whose format ``node``'s codes carry (pass-through ops keep their input's)."""
    while node.meta.get(meta.ROLE) == "pass":
        node = data_inputs(node)[0]
    return node


def requant_source(fq_node: fx.Node) -> fx.Node:
    """The node a FakeQuant requantizes: its input, or the producer of a ReLU/clamp fused into it."""
    src = fq_node.args[0]
    if src.meta.get(meta.KIND) in meta.ACTIVATIONS and src.meta.get(meta.ROLE) == "qpoint":
        return src.args[0]
    return src


def is_nonnegative(node: fx.Node) -> bool:
    """True when the values are non-negative by construction (after ReLU, a clamp at >= 0, ...)."""
    kind = node.meta.get(meta.KIND)
    if kind in meta.NONNEGATIVE:
        return True
    if kind == "clamp":
        return node.args[1] >= 0 or is_nonnegative(node.args[0])
    if kind in meta.SIGN_OF_INPUT:
        return is_nonnegative(node.args[0])
    if kind in meta.SIGN_OF_ALL_INPUTS:
        return all(is_nonnegative(x) for x in data_inputs(node))
    return False


def weighted_consumers(node: fx.Node, through: frozenset) -> list[fx.Node] | None:
    """The conv/linear layers that read ``node``'s value through ops of the kinds in ``through`` (ops a
    positive factor commutes with, so the layers can absorb it); None if any path reaches anything else."""
    found = []
    for user in node.users:
        kind = user.meta.get(meta.KIND)
        if kind in meta.WEIGHTED and user.args[0] is node:
            found.append(user)
        elif kind in through:
            below = weighted_consumers(user, through)
            if below is None:
                return None
            found.extend(below)
        else:
            return None
    return found or None


def weighted_layers(gm: fx.GraphModule):
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.meta.get(meta.KIND) in meta.WEIGHTED:
            yield node, modules[node.target]


def attr_value(gm: fx.GraphModule, target: str):
    """The parameter, buffer or attribute a get_attr node reads."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
