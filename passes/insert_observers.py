"""insert_observers: decide where the integer graph quantizes, and attach an observer there.

A quantization point ("qpoint") is where a fresh integer tensor is produced: the model input, a
conv/linear/add/matmul output (or the ReLU/clamp fused after it), an average pool, a float island's
output (softmax, GELU, LayerNorm), a constant used as data (class token, position embedding). Pass-through ops (flatten,
reshape, max-pool, pad, cat, permute, select, expand_batch, a standalone ReLU/clamp) keep their input's
codes and format.

Reads: ``meta[KIND]``. Writes: ``meta[ROLE]`` on every node, ``meta[FUSED_ACT]`` on a conv/linear/add
whose only user is a ReLU/clamp (that activation becomes the qpoint), ``meta[OBSERVER]`` (an
fxq.observers.Observer) on every qpoint. The graph itself is unchanged: calibration feeds observers
from an interpreter, so no observer module can leak into the compiled model.
"""
from __future__ import annotations

import torch.fx as fx

from fxq import meta
from fxq.context import CompileContext
from fxq.observers import Observer

def insert_observers(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    fused: set[str] = set()
    for node in gm.graph.nodes:
        kind = node.meta[meta.KIND]
        if kind in meta.ACC_PRODUCERS and len(node.users) == 1 and next(iter(node.users)).meta[meta.KIND] in meta.ACTIVATIONS:
            act = next(iter(node.users))
            node.meta[meta.ROLE] = "acc"
            node.meta[meta.FUSED_ACT] = act.name
            fused.add(act.name)
        elif kind == "input":
            # token ids are integers already: nothing to quantize
            node.meta[meta.ROLE] = "input" if ctx.example_input.is_floating_point() else "ids"
        elif kind == "token_mask":
            node.meta[meta.ROLE] = "mask"
        elif kind == "output":
            node.meta[meta.ROLE] = "output"
        elif kind in meta.PASS_THROUGH and node.name not in fused:
            node.meta[meta.ROLE] = "pass"
        else:
            node.meta[meta.ROLE] = "qpoint"
        if node.meta[meta.ROLE] in ("qpoint", "input"):
            node.meta[meta.OBSERVER] = Observer(node.name, seed=ctx.seed)
    return gm
