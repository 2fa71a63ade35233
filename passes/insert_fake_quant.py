"""insert_fake_quant: turn the annotated float graph into the fake-quant model.

Every qpoint gets a FakeQuant module after it; every conv/linear becomes a QConv2d/QLinear that rounds
its weights per channel and its bias to int32 at f_w + f_x; a standalone clamp's bounds move onto its
input's grid. The result computes, in float, exactly the values the integer graph will hold.

Reads: ``meta[ACT_FMT]``, ``meta[W_FMT]``, ``meta[ROLE]``, ``meta[FUSED_ACT]``, ``ctx.target.rounding``.
Writes: submodules ``fq_<node>`` and the quantized layers; FakeQuant nodes carry ``meta[KIND]`` =
"fake_quant" and ``meta[ACT_FMT]``. Requires: choose_formats, share_scales.
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from fxq import meta
from fxq.context import CompileContext
from fxq.fakequant import FakeQuant, QConv2d, QLinear, on_grid_clamp
from fxq.walk import format_source


def insert_fake_quant(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    rounding = ctx.target.rounding
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        role, kind = node.meta[meta.ROLE], node.meta[meta.KIND]
        if kind in meta.WEIGHTED:
            in_frac = format_source(node.args[0]).meta[meta.ACT_FMT].frac
            layer = modules[node.target]
            cls = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
            parent, _, attr = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, cls(layer, node.meta[meta.W_FMT], in_frac, rounding))
        if role == "pass" and kind == "clamp":
            frac = format_source(node.args[0]).meta[meta.ACT_FMT].frac
            node.args = (node.args[0], *on_grid_clamp(node.args[1], node.args[2], frac))
        if role in ("qpoint", "input"):
            fmt = node.meta[meta.ACT_FMT]
            name = f"fq_{node.name}"
            gm.add_submodule(name, FakeQuant(fmt, rounding))
            with gm.graph.inserting_after(node):
                fq = gm.graph.call_module(name, (node,))
            node.replace_all_uses_with(fq, delete_user_cb=lambda u: u is not fq)
            fq.meta.update({meta.KIND: "fake_quant", meta.ROLE: "fake_quant", meta.ACT_FMT: fmt,
                            meta.SHAPE: node.meta.get(meta.SHAPE)})
    return gm
