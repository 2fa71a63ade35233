"""Running a fake-quant graph node by node, all samples at once, beside its float twin.

Passes that need every layer's input in the quantized model and in the float model side by side (bias
correction, GPTQ on quantized inputs) walk the graph in order with one value environment each and
change a layer before the walk moves past it, so what runs downstream sees the change.
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from fxq.fakequant import FakeQuant, IntNonlinear, QAdd, _QWeighted

CHUNK = 32          # samples per module call, to bound the temporaries of one node


@contextlib.contextmanager
def as_float(module: torch.nn.Module):
    """The same module computing in float (fake-quant modules only; others are unchanged)."""
    if not isinstance(module, (FakeQuant, QAdd, _QWeighted, IntNonlinear)):
        yield module
        return
    module.enabled = False
    try:
        yield module
    finally:
        module.enabled = True


def _call(fn, args: tuple, kwargs: dict):
    """``fn`` over the samples in chunks when it takes one tensor, else in one call."""
    if len(args) == 1 and isinstance(args[0], torch.Tensor) and not kwargs and args[0].shape[0] > CHUNK:
        return torch.cat([fn(a) for a in args[0].split(CHUNK)])
    return fn(*args, **kwargs)


def run_node(node: fx.Node, gm: fx.GraphModule, modules: dict, env: dict, float_: bool = False):
    """``node``'s value from the values of its inputs in ``env`` (keyed by node name)."""
    args = map_arg(node.args, lambda a: env[a.name])
    kwargs = map_arg(node.kwargs, lambda a: env[a.name])
    if node.op == "call_module":
        m = modules[node.target]
        if float_:
            with as_float(m):
                return _call(m, args, kwargs)
        return _call(m, args, kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return getattr(gm, node.target)                      # get_attr


def walk(gm: fx.GraphModule, x: torch.Tensor, *envs: dict):
    """Yield the graph's compute nodes in order, each env holding ``x`` at the placeholders; once the
    caller is done with a node, forget the values no later node reads."""
    last_use = {a.name: n.name for n in gm.graph.nodes for a in n.all_input_nodes}
    for node in gm.graph.nodes:
        if node.op == "output":
            return
        if node.op == "placeholder":
            for env in envs:
                env[node.name] = x
            continue
        yield node
        for a in node.all_input_nodes:
            if last_use.get(a.name) == node.name:
                for env in envs:
                    env.pop(a.name, None)
