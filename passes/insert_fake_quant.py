"""insert_fake_quant: turn the annotated float graph into the fake-quant model.

Every qpoint gets a FakeQuant module after it; every conv/linear becomes a QConv2d/QLinear that rounds
its weights per channel and its bias to int32 at the accumulator's step; a standalone clamp's bounds
move onto its input's grid. The result computes, in float, exactly the values the integer graph will hold.

Float islands and constants quantize float values directly, like the model input. A softmax/GELU/
LayerNorm the target does not declare a float island becomes an IntNonlinear module (fxq.int_nonlinear):
integer codes in, integer codes out.
On a dyadic target (``requant`` "dyadic", int8) the FakeQuant that ends a conv/linear/matmul/add/pool also
carries the integer multiplier and shift of that requant (chosen here, read back by the lowering), a
fused ReLU/clamp is dropped in favour of the format's code range (which is what the integer graph
clamps to), and each residual add becomes a QAdd that forms the integer sum of both inputs.

Reads: ``meta[ACT_FMT]``, ``meta[W_FMT]``, ``meta[ROLE]``, ``meta[KIND]``, ``ctx.target``.
Writes: submodules ``fq_<node>``, ``qadd_<node>`` and the quantized layers; FakeQuant nodes carry
``meta[KIND]`` = "fake_quant" and ``meta[ACT_FMT]``. Requires: choose_formats, share_scales.
"""
from __future__ import annotations

import numpy as np
import torch.fx as fx
from torch import nn

from fxq import meta
from fxq.context import CompileContext
from fxq.errors import UnsupportedOp, describe_node
from fxq.fakequant import DyadicRequant, FakeQuant, IntNonlinear, QAdd, QConv2d, QLinear, on_grid_clamp
from fxq.formats import dyadic, step_of
from fxq.walk import data_inputs, format_source


def _in_fmt(node: fx.Node):
    return format_source(node).meta[meta.ACT_FMT]


def _dyadic_requant(producer: fx.Node, out_fmt, modules, gm: fx.GraphModule, bits: int) -> DyadicRequant:
    """The multiplier and shift taking ``producer``'s integer result to ``out_fmt``'s codes."""
    kind = producer.meta[meta.KIND]
    if kind in meta.WEIGHTED:
        layer = modules[producer.target]
        src_mant = layer.acc_mant
        src_frac = layer.w_fmt.frac_array + layer.in_frac
        m, n = dyadic(step_of(src_frac, src_mant) / out_fmt.step, bits)
        return DyadicRequant(src_mant, src_frac, m, n, channel_axis=1 if isinstance(layer, QConv2d) else -1)
    if kind == "avgpool":
        x = _in_fmt(producer.args[0])
        k = int(producer.args[6]).bit_length() - 1
        m, n = dyadic(x.step * 2.0 ** -k / out_fmt.step, bits)
        return DyadicRequant(x.mant, x.frac + k, m, n)
    if kind == "matmul":
        a, b = (_in_fmt(x) for x in data_inputs(producer))
        m, n = dyadic(a.step * b.step / out_fmt.step, bits)
        return DyadicRequant(int(a.mant) * int(b.mant), int(a.frac) + int(b.frac), m, n)
    if kind == "add":
        a, b = (_in_fmt(x) for x in data_inputs(producer))
        ratios = np.array([a.step, b.step]) / out_fmt.step
        _, n = dyadic(ratios.max(), bits)                        # one shift; the larger ratio sets it
        multipliers = tuple(int(v) for v in np.rint(ratios * 2.0 ** int(n)))
        name = f"qadd_{producer.name}"
        gm.add_submodule(name, QAdd(a, b, multipliers))
        producer.op, producer.target, producer.kwargs = "call_module", name, {}
        producer.args = tuple(data_inputs(producer))
        return DyadicRequant(1, 0, 1, n)
    raise UnsupportedOp(f"{describe_node(producer)}: no integer op with a dyadic requant produces a {kind!r} output")


def _integer_nonlinear(gm: fx.GraphModule, node: fx.Node, modules: dict) -> None:
    """A softmax/GELU/LayerNorm the target does not run as a float island becomes fxq's integer kernel,
    between the FakeQuant of its input's codes and its own."""
    fn = node.meta[meta.KIND]
    src = format_source(node.args[0])                 # the FakeQuant whose codes the kernel reads
    (out,) = [u for u in node.users if u.meta[meta.KIND] == "fake_quant"]
    fq_in, fq_out = modules[src.target], modules[out.target]
    for what, f in (("input", fq_in.fmt), ("output", fq_out.fmt)):
        if f.mant != 1 or f.zp != 0:
            raise UnsupportedOp(f"{describe_node(node)}: the integer {fn} needs power-of-two formats, but its {what} "
                                f"is {f.describe()}; allow {fn!r} in the target's float_islands")
    module = modules[node.target] if node.op == "call_module" else None
    extra = tuple(a for a in node.args[1:] if isinstance(a, fx.Node))          # a token validity mask
    float_args = tuple(a for a in node.args[1:] if not isinstance(a, fx.Node)) if node.op == "call_function" else ()
    width = int(node.args[0].meta[meta.SHAPE][-1])
    kernel = IntNonlinear(fn, module, fq_in, fq_out, width, float_args)
    try:
        kernel.constants()
    except ValueError as exc:
        raise UnsupportedOp(f"{describe_node(node)}: no integer {fn} for these formats ({exc}); allow {fn!r} in the "
                            f"target's float_islands") from None
    name = f"int_{node.name}"
    gm.add_submodule(name, kernel)
    node.op, node.target, node.args, node.kwargs = "call_module", name, (node.args[0],) + extra, {}


def insert_fake_quant(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    t = ctx.target
    rounding = t.rounding
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.meta[meta.KIND] in meta.WEIGHTED:
            layer = modules[node.target]
            cls = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
            parent, _, attr = node.target.rpartition(".")
            qlayer = cls(layer, node.meta[meta.W_FMT], _in_fmt(node.args[0]), rounding)
            setattr(gm.get_submodule(parent) if parent else gm, attr, qlayer)
            modules[node.target] = qlayer
    for node in list(gm.graph.nodes):
        role, kind = node.meta[meta.ROLE], node.meta[meta.KIND]
        if role == "pass" and kind == "clamp":
            node.args = (node.args[0], *on_grid_clamp(node.args[1], node.args[2], _in_fmt(node.args[0])))
        if role not in ("qpoint", "input"):
            continue
        fmt = node.meta[meta.ACT_FMT]
        requant, value = None, node
        if t.requant == "dyadic" and role == "qpoint" and kind not in meta.ISLANDS | {"const"}:
            producer = node.args[0] if kind in meta.ACTIVATIONS else node
            requant = _dyadic_requant(producer, fmt, modules, gm, t.multiplier_bits)
            value = producer              # the format's code range is the fused activation's clamp
        name = f"fq_{node.name}"
        gm.add_submodule(name, FakeQuant(fmt, rounding, requant))
        with gm.graph.inserting_after(node):
            fq = gm.graph.call_module(name, (value,))
        node.replace_all_uses_with(fq, delete_user_cb=lambda u: u is not fq)
        fq.meta.update({meta.KIND: "fake_quant", meta.ROLE: "fake_quant", meta.ACT_FMT: fmt,
                        meta.SHAPE: node.meta.get(meta.SHAPE)})
        if value is not node:
            gm.graph.erase_node(node)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.meta[meta.KIND] in meta.ISLANDS and node.meta[meta.KIND] not in t.float_islands:
            _integer_nonlinear(gm, node, modules)
    return gm

