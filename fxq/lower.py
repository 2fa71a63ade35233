"""lower: the fake-quant GraphModule becomes the integer IR.

Reads: ``meta[KIND]``, ``meta[ROLE]``, ``meta[ACT_FMT]``, ``meta[SHAPE]`` and the QConv2d/QLinear/
QAdd/FakeQuant modules that insert_fake_quant left. Each FakeQuant marks where a requantizing op ends:
its producer (conv/linear/matmul accumulator, add, average pool, float island, constant or the model
input) is emitted there with the format's shift and clamp, and on dyadic targets the multiplier the
FakeQuant holds. Constants are the codes the fake-quant modules round to, computed by the same
fxq.formats functions. A linear layer on tokens ([N, T, D]) runs on rows: its input is reshaped to
[N*T, D] and its requantized output back, so per-channel shifts stay on axis 1.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch.fx as fx

from . import islands, meta
from .errors import UnsupportedOp, describe_node
from .fakequant import IntNonlinear, QAdd, QConv2d, QLinear, clamp_codes
from .formats import ACC_RANGE, DEFAULT_ROUNDING, quantize_np, storage_dtype
from .ir import INT_NONLINEAR_OPS, TOKEN_COMPARISONS, Graph, Node, Op, TensorType
from .qtypes import ActFormat
from .targets import Target
from .walk import attr_value, data_inputs, requant_source


def _batchless(shape) -> tuple:
    return (None,) + tuple(shape[1:])


def _act_type(fmt: ActFormat, shape) -> TensorType:
    r = fmt.range
    return TensorType(fmt.dtype, _batchless(shape), int(fmt.frac), r.lo, r.hi, int(fmt.mant), int(fmt.zp))


def _ints(v) -> tuple:
    return tuple(int(x) for x in np.atleast_1d(np.asarray(v)))


class _Lowerer:
    def __init__(self, gm: fx.GraphModule, target: Target):
        self.gm = gm
        self.target = target
        self.modules = dict(gm.named_modules())
        self.nodes: list[Node] = []
        self.types: dict[str, TensorType] = {}
        self.name_of: dict[str, str] = {}     # fx node name -> IR tensor name
        self.rows_of: dict[str, str] = {}     # IR tensor -> its [rows, features] view (linear on tokens)

    def emit(self, name, op, inputs, out, attrs=None, consts=None) -> str:
        self.nodes.append(Node(name, op, list(inputs), out, attrs or {}, consts or {}))
        self.types[name] = out
        return name

    def ir_input(self, fx_node) -> str:
        return self.name_of[fx_node.name]

    def run(self) -> Graph:
        input_name = input_type = output = None
        for node in self.gm.graph.nodes:
            kind, role = node.meta.get(meta.KIND), node.meta.get(meta.ROLE)
            if kind == "input":
                input_name = node.name
                dtype = "int64" if role == "ids" else "float32"         # token ids stay integers
                input_type = TensorType(dtype, _batchless(node.meta[meta.SHAPE]))
                self.types[input_name] = input_type
                self.name_of[node.name] = node.name
            elif kind == "token_mask":
                op = TOKEN_COMPARISONS[node.target]
                out = TensorType("uint8", _batchless(node.meta[meta.SHAPE]), 0, 0, 1)
                self.name_of[node.name] = self.emit(node.name, Op.TOKEN_MASK, [self.ir_input(node.args[0])], out,
                                                    {"compare": op, "value": int(node.args[1])})
            elif kind == "output":
                src = self.ir_input(node.args[0])
                t = self.types[src]
                output = self.emit("output", Op.DEQUANTIZE, [src], TensorType("float32", t.shape))
            elif kind == "fake_quant":
                name = self.requantize(node)
                last = next(n for n in reversed(self.nodes) if n.op is not Op.RESHAPE)
                last.src = node.name      # where report() finds its float value
                self.name_of[node.name] = self.twin(name, node.meta[meta.ACT_FMT])
            elif kind in meta.WEIGHTED:
                self.name_of[node.name] = self.weighted(node)
            elif role == "pass":
                self.name_of[node.name] = self.pass_through(node)
            elif role in ("acc", "qpoint"):
                continue          # emitted by the FakeQuant that ends it
            else:
                raise UnsupportedOp(f"{describe_node(node)}: nothing lowers kind {kind!r} with role {role!r}")
        g = Graph(input_name, input_type, self.nodes, output, self.target.as_row())
        return g.verify()

    # -- requantizing ops, emitted at their FakeQuant ------------------------------------------------
    def requantize(self, fq_node) -> str:
        fmt: ActFormat = fq_node.meta[meta.ACT_FMT]
        src = requant_source(fq_node)               # a fused activation: its producer's clamp
        shape = fq_node.meta[meta.SHAPE] or src.meta[meta.SHAPE]
        out = _act_type(fmt, shape)
        rounding = self.target.rounding.value
        kind = src.meta[meta.KIND]
        name = src.name
        dyadic = self.modules[fq_node.target].requant        # the multiplier and shift, on dyadic targets
        if kind == "input":
            return self.emit(f"{name}_q", Op.QUANTIZE, [name], out, {"rounding": rounding})
        if kind in meta.WEIGHTED or kind == "matmul":
            acc = self.ir_input(src) if kind in meta.WEIGHTED else self.matmul(src)
            acc_t = self.types[acc]
            rows = len(acc_t.shape) != len(out.shape)          # a linear on tokens ran on rows
            rq_out = replace(out, shape=acc_t.shape) if rows else out
            if dyadic is not None:
                rq = self.emit(f"{name}_rq", Op.REQUANT, [acc], rq_out, {
                    "multiplier": _ints(dyadic.multiplier), "shift": _ints(dyadic.shift), "rounding": rounding})
            else:
                shift = tuple(int(f) - fmt.frac for f in np.atleast_1d(acc_t.frac))
                rq = self.emit(f"{name}_rq", Op.REQUANT, [acc], rq_out, {"shift": shift, "rounding": rounding})
            if not rows:
                return rq
            return self.emit(f"{name}_tokens", Op.RESHAPE, [rq], out, {"shape": (-1,) + tuple(out.shape[1:])})
        if kind in meta.ISLANDS:
            return self.island(src, out, rounding)
        if kind == "embedding":
            table = self.act_codes(self.modules[src.target].weight, fmt)
            return self.emit(name, Op.GATHER, [self.ir_input(src.args[0])], out, {}, {"table": table})
        if kind == "const":
            codes = self.act_codes(attr_value(self.gm, src.target), fmt)
            return self.emit(name, Op.CONST, [], replace(out, shape=tuple(codes.shape)), {}, {"codes": codes})
        if kind == "add":
            a, b = (self.ir_input(x) for x in src.args[:2])
            if dyadic is not None:
                qadd: QAdd = self.modules[src.target]
                return self.emit(name, Op.ADD_INT, [a, b], out, {
                    "multipliers": qadd.multipliers, "in_zp": (self.types[a].zp, self.types[b].zp),
                    "shift": int(dyadic.shift), "rounding": rounding})
            fa, fb = int(self.types[a].frac), int(self.types[b].frac)
            common = max(fa, fb)
            return self.emit(name, Op.ADD_INT, [a, b], out, {"align": (common - fa, common - fb),
                                                             "shift": common - fmt.frac, "rounding": rounding})
        if kind == "avgpool":
            x = self.ir_input(src.args[0])
            _, kernel, stride, padding, _, _, divisor = src.args[:7]
            k = int(divisor).bit_length() - 1
            attrs = {"kernel": tuple(kernel), "stride": tuple(stride), "padding": tuple(padding), "divisor_log2": k,
                     "shift": int(self.types[x].frac) + k - fmt.frac, "rounding": rounding}
            if dyadic is not None:
                attrs.update(multiplier=int(dyadic.multiplier), shift=int(dyadic.shift), x_zp=self.types[x].zp)
            return self.emit(name, Op.AVGPOOL_INT, [x], out, attrs)
        raise UnsupportedOp(f"{describe_node(src)}: no integer op produces a {kind!r} output")

    def act_codes(self, value, fmt: ActFormat) -> np.ndarray:
        """A constant tensor (embedding table, class token) as codes of an activation format."""
        codes = quantize_np(value.detach().double().numpy(), fmt.frac, fmt.range, self.target.rounding, fmt.mant,
                            fmt.zp)
        return codes.astype(storage_dtype(fmt.bits, fmt.signed))

    def twin(self, name: str, fmt: ActFormat) -> str:
        """Twin-uniform qpoints: the producer's fine codes are stored as b-bit twin codes and expanded
        again (R2 shifted left by m) where they are read."""
        if fmt.twin is None:
            return name
        t, fine = fmt.twin, self.types[name]
        code = replace(fine, dtype=storage_dtype(t.bits, False), lo=t.code_range.lo, hi=t.code_range.hi,
                       twin=(t.bits, t.shift, t.signed))
        packed = self.emit(f"{name}_twin", Op.TWIN_QUANT, [name], code, {"rounding": DEFAULT_ROUNDING.value})
        return self.emit(f"{name}_fine", Op.TWIN_EXPAND, [packed], fine)

    # -- matmul of two activations, float islands ----------------------------------------------------
    def matmul(self, node) -> str:
        a, b = (self.ir_input(x) for x in data_inputs(node))
        ta, tb = self.types[a], self.types[b]
        bound = int(ta.shape[-1]) * ta.max_abs * tb.max_abs
        out = TensorType("int32", _batchless(node.meta[meta.SHAPE]), int(ta.frac) + int(tb.frac), -bound, bound,
                         int(ta.mant) * int(tb.mant))
        attrs = {k: int(t.zp) for k, t in (("a_zp", ta), ("b_zp", tb)) if t.zp}
        return self.emit(node.name, Op.MATMUL_INT, [a, b], out, attrs)

    def island(self, node, out: TensorType, rounding: str) -> str:
        kind = node.meta[meta.KIND]
        ins = [self.ir_input(a) for a in node.args if isinstance(a, fx.Node)]    # codes (, token validity)
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, IntNonlinear):
            return self.integer_nonlinear(node, module, ins, out)
        attrs, consts = {"fn": kind, "rounding": rounding}, {}
        if isinstance(module, islands.TokenMaskedSoftmax):
            attrs.update(on_valid=module.on_valid, on_invalid=module.on_invalid)
        elif kind == "softmax" and node.op == "call_module":
            consts["mask"] = self.modules[node.target].mask.numpy()
        elif kind == "l2_normalize":
            attrs["eps"] = float(node.args[1])
        elif kind == "gelu":
            attrs["approximate"] = str(node.args[1])
        elif kind == "layer_norm":
            m = self.modules[node.target]
            attrs["eps"] = float(m.eps)
            if m.weight is not None:
                consts["weight"] = m.weight.detach().double().numpy()
            if m.bias is not None:
                consts["bias"] = m.bias.detach().double().numpy()
        return self.emit(node.name, Op.FLOAT_ISLAND, ins, out, attrs, consts)

    def integer_nonlinear(self, node, m: IntNonlinear, ins: list[str], out: TensorType) -> str:
        """The IR keeps what the kernel needs: fracs in the types, LayerNorm's integer constants, mask codes."""
        attrs, consts = {}, {}
        c, mask, key_mask = m.constants()
        if m.fn == "layer_norm":
            attrs = {"n": c.n, "var_shift": c.var_shift, "eps": int(c.eps), "norm_shift": c.norm_shift,
                     "norm_max": c.norm_max, "gamma_frac": c.gamma_frac, "out_shift": c.out_shift}
            consts = {"gamma": np.asarray(c.gamma, np.int64), "beta": np.asarray(c.beta, np.int64)}
        if mask is not None:
            consts["mask"] = np.asarray(mask, np.int16)
        if key_mask is not None:
            attrs["key_mask"] = tuple(key_mask)
        return self.emit(node.name, INT_NONLINEAR_OPS[m.fn], ins, out, attrs, consts)

    # -- conv / linear: accumulate in int32 -----------------------------------------------------------
    def as_rows(self, x: str) -> str:
        """[N, T, D] codes as [N*T, D] rows, once per tensor."""
        if x not in self.rows_of:
            t = self.types[x]
            self.rows_of[x] = self.emit(f"{x}_rows", Op.RESHAPE, [x], replace(t, shape=(None, t.shape[-1])),
                                        {"shape": (-1, int(t.shape[-1]))})
        return self.rows_of[x]

    def weighted(self, node) -> str:
        layer = self.modules[node.target]
        assert isinstance(layer, (QConv2d, QLinear))
        x = self.ir_input(node.args[0])
        if isinstance(layer, QLinear) and len(self.types[x].shape) > 2:
            x = self.as_rows(x)
        xt = self.types[x]
        w_frac, w_mant = layer.w_fmt.frac_array, layer.w_fmt.mant_array
        is_conv = isinstance(layer, QConv2d)
        attrs = {"w_bits": layer.w_fmt.bits, "w_frac": tuple(int(f) for f in w_frac)}
        if np.any(w_mant != 1):
            attrs["w_mant"] = _ints(w_mant)
        if getattr(layer.w_fmt, "full_range", False):
            attrs["w_full_range"] = True           # codes reach -2**(w_bits-1)
        if xt.zp:
            attrs["x_zp"] = int(xt.zp)          # products see code - zp, so zero padding stays 0.0
        if layer.clustered:
            cc = layer.cluster_codes()
            w_codes = cc.effective()
            consts = {"t": cc.codes.astype(np.int8),
                      "alpha": cc.alpha.astype(storage_dtype(layer.w_fmt.scale_bits, signed=False))}
            attrs.update(cluster_size=int(cc.block), alpha_bits=int(layer.w_fmt.scale_bits))
            op = Op.CONV2D_CLUSTER if is_conv else Op.LINEAR_CLUSTER
        else:
            w = layer.weight_q.detach().double().numpy()
            shape = (-1,) + (1,) * (w.ndim - 1)
            w_codes = quantize_np(w, w_frac.reshape(shape), layer.w_fmt.range, layer.rounding, w_mant.reshape(shape))
            consts = {"w": w_codes.astype(storage_dtype(layer.w_fmt.bits, signed=True))}
            op = Op.CONV2D_INT if is_conv else Op.LINEAR_INT
        b_frac = w_frac + int(xt.frac)
        b_mant = w_mant * int(xt.mant)
        b_codes = quantize_np(layer.bias_q.detach().double().numpy(), b_frac, ACC_RANGE, layer.rounding, b_mant)
        consts["b"] = b_codes.astype(np.int32)
        bound = np.abs(w_codes).reshape(w_codes.shape[0], -1).sum(axis=1) * xt.max_abs + np.abs(b_codes)
        acc_max = int(min(bound.max(), 2**62))
        mant = _ints(b_mant) if np.any(b_mant != 1) else 1
        shape = _batchless(node.meta[meta.SHAPE]) if is_conv else (None, int(w_codes.shape[0]))
        out = TensorType("int32", shape, _ints(b_frac), -acc_max, acc_max, mant)
        if is_conv:
            attrs.update(stride=tuple(layer.stride), padding=tuple(layer.padding),
                         dilation=tuple(layer.dilation), groups=int(layer.groups))
        return self.emit(node.name, op, [x], out, attrs, consts)

    # -- ops that keep their input's format --------------------------------------------------------
    def pass_through(self, node) -> str:
        kind = node.meta[meta.KIND]
        shape = _batchless(node.meta[meta.SHAPE])
        if kind == "cat":
            ins = [self.ir_input(x) for x in node.args[0]]
            t0 = self.types[ins[0]]
            lo, hi = min(self.types[i].lo for i in ins), max(self.types[i].hi for i in ins)
            return self.emit(node.name, Op.CONCAT_INT, ins, replace(t0, shape=shape, lo=lo, hi=hi),
                             {"axis": int(node.args[1])})
        x = self.ir_input(node.args[0])
        t = self.types[x]
        same = replace(t, shape=shape)
        if kind in ("flatten", "reshape"):
            return self.emit(node.name, Op.RESHAPE, [x], same, {"shape": (-1,) + tuple(shape[1:])})
        if kind == "permute":
            return self.emit(node.name, Op.PERMUTE, [x], same, {"perm": tuple(int(d) for d in node.args[1])})
        if kind == "select":
            return self.emit(node.name, Op.SELECT, [x], same, {"axis": int(node.args[1]), "index": int(node.args[2])})
        if kind == "expand_batch":
            return self.emit(node.name, Op.EXPAND_BATCH, [x, self.ir_input(node.args[1])], same)
        if kind == "maxpool":
            _, kernel, stride, padding, dilation, ceil_mode = node.args[:6]
            return self.emit(node.name, Op.MAXPOOL_INT, [x], same, {
                "kernel": tuple(kernel), "stride": tuple(stride), "padding": tuple(padding),
                "dilation": tuple(dilation), "ceil_mode": bool(ceil_mode)})
        if kind == "pad":                           # pads with the code of 0.0
            lo, hi = min(t.lo, t.zp), max(t.hi, t.zp)
            return self.emit(node.name, Op.PAD_INT, [x], replace(t, shape=shape, lo=lo, hi=hi),
                             {"pads": tuple(int(p) for p in node.args[1])})
        if kind in ("relu", "clamp"):
            bounds = (0.0, float("inf")) if kind == "relu" else (node.args[1], node.args[2])
            codes = clamp_codes(*bounds, t.frac, int(t.mant), t.zp)
            lo, hi = max(t.lo, codes.lo), min(t.hi, codes.hi)
            return self.emit(node.name, Op.CLAMP_INT, [x], replace(t, shape=shape, lo=lo, hi=hi), {"lo": lo, "hi": hi})
        raise UnsupportedOp(f"{describe_node(node)}: no integer op for pass-through kind {kind!r}")


def lower(gm: fx.GraphModule, target: Target) -> Graph:
    return _Lowerer(gm, target).run()
