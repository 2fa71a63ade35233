"""canonicalize: one spelling per op, so later passes test ``meta[KIND]`` instead of listing spellings.

Reads: the traced graph and ``ctx.example_input`` (static shapes for adaptive pools and reshapes).
Writes: ``meta[KIND]`` on every node. Rewrites in place: activations, pools, pads, adds, concats,
flattens and reshapes become the call_function forms below; Identity and eval-mode Dropout are
removed; conv, linear and BatchNorm stay as call_module.

    relu     torch.relu(x)                      clamp    torch.clamp(x, lo, hi)   (ReLU6, hardtanh)
    add      operator.add(a, b)                 cat      torch.cat(xs, dim)
    flatten  torch.flatten(x, start, end)       reshape  torch.reshape(x, (-1, ...))
    maxpool  F.max_pool2d(x, k, s, p, d, ceil)  avgpool  F.avg_pool2d(x, k, s, p, ceil, count_pad)
    pad      F.pad(x, pads, "constant", 0.0)

Raises UnsupportedOp naming the node, its op and the user's source line for anything else.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxq import meta
from fxq.context import CompileContext
from fxq.errors import UnsupportedOp, describe_node

SUPPORTED_TEXT = ("Conv2d, Linear, BatchNorm (after a conv/linear), ReLU, ReLU6/Hardtanh/clamp, MaxPool2d, "
                  "AvgPool2d, AdaptiveAvgPool2d(1), flatten/view/reshape, residual add, cat, ZeroPad2d, "
                  "Identity, eval-mode Dropout")

_RELU_FNS = {torch.relu, F.relu, torch.relu_, getattr(F, "relu_", None)} - {None}
_ADD_FNS = {operator.add, operator.iadd, torch.add}
_CAT_FNS = {torch.cat, torch.concat, getattr(torch, "concatenate", torch.cat)}
_DROPOUT_FNS = {F.dropout, F.dropout2d, torch.dropout}
_DROPOUT_MODS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_REMOVED_METHODS = {"contiguous"}


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _unsupported(node: fx.Node, why: str = "") -> UnsupportedOp:
    return UnsupportedOp(f"{describe_node(node)}: unsupported op{': ' + why if why else ''}.\n"
                         f"  fxq lowers: {SUPPORTED_TEXT}")


def _shape(node) -> tuple | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _is_global_mean(node: fx.Node) -> bool:
    dims = _arg(node, 1, "dim")
    shape = _shape(node.args[0])
    if dims is None or shape is None or len(shape) != 4:
        return False
    dims = {d % 4 for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    return dims == {2, 3}


class _Rewriter:
    """Maps one node to its canonical (kind, function, args); None means 'remove, use input'."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())

    def canonical(self, node: fx.Node):
        if node.op == "placeholder":
            return ("input", None, None)
        if node.op == "output":
            return ("output", None, None)
        if node.op == "call_module":
            return self._module(node, self.modules[node.target])
        if node.op == "call_function":
            return self._function(node, node.target)
        if node.op == "call_method":
            return self._method(node, node.target)
        raise _unsupported(node, "parameters and buffers may only be used by the layers that own them")

    # -- nn.Module calls -----------------------------------------------------------------------
    def _module(self, node, m):
        x = node.args[0] if node.args else None
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise _unsupported(node, f"Conv2d padding_mode={m.padding_mode!r}; only zero padding is lowered")
            if isinstance(m.padding, str):
                m.padding = self._explicit_padding(node, m)
            return ("conv", "module", None)
        if isinstance(m, nn.Linear):
            return ("linear", "module", None)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.training or not m.track_running_stats or m.running_mean is None:
                raise _unsupported(node, "BatchNorm must be in eval mode with running statistics "
                                         "(call model.eval() before fxq.compile)")
            return ("bn", "module", None)
        if isinstance(m, nn.ReLU):
            return ("relu", torch.relu, (x,))
        if isinstance(m, nn.ReLU6):
            return ("clamp", torch.clamp, (x, 0.0, 6.0))
        if isinstance(m, nn.Hardtanh):
            return ("clamp", torch.clamp, (x, float(m.min_val), float(m.max_val)))
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise _unsupported(node, "MaxPool2d(return_indices=True)")
            return self._maxpool(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        if isinstance(m, nn.AvgPool2d):
            if m.divisor_override is not None:
                raise _unsupported(node, "AvgPool2d(divisor_override=...)")
            return self._avgpool(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self._adaptive(node, x, m.output_size)
        if isinstance(m, nn.Flatten):
            return ("flatten", torch.flatten, (x, m.start_dim, m.end_dim))
        if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
            if float(getattr(m, "value", 0.0)) != 0.0:
                raise _unsupported(node, "constant padding with a non-zero value")
            return ("pad", F.pad, (x, tuple(m.padding), "constant", 0.0))
        if isinstance(m, nn.Identity):
            return None
        if isinstance(m, _DROPOUT_MODS):
            if m.training:
                raise _unsupported(node, "Dropout in training mode (call model.eval() before fxq.compile)")
            return None
        raise _unsupported(node, f"module type {type(m).__name__}")

    # -- functions -------------------------------------------------------------------------------
    def _function(self, node, fn):
        x = node.args[0] if node.args else None
        if fn in _RELU_FNS:
            return ("relu", torch.relu, (x,))
        if fn is F.relu6:
            return ("clamp", torch.clamp, (x, 0.0, 6.0))
        if fn is F.hardtanh:
            return ("clamp", torch.clamp, (x, float(_arg(node, 1, "min_val", -1.0)), float(_arg(node, 2, "max_val", 1.0))))
        if fn in (torch.clamp, torch.clip):
            return self._clamp(node, x, _arg(node, 1, "min"), _arg(node, 2, "max"))
        if fn in _ADD_FNS:
            return self._add(node, node.args[0], node.args[1], node.kwargs.get("alpha", 1))
        if fn in _CAT_FNS:
            return self._cat(node, _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0))
        if fn is torch.flatten:
            return ("flatten", torch.flatten, (x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)))
        if fn is torch.reshape:
            return self._reshape(node, x)
        if fn is F.max_pool2d:
            if _arg(node, 6, "return_indices", False):
                raise _unsupported(node, "max_pool2d(return_indices=True)")
            k = _arg(node, 1, "kernel_size")
            return self._maxpool(x, k, _arg(node, 2, "stride") or k, _arg(node, 3, "padding", 0),
                                 _arg(node, 4, "dilation", 1), _arg(node, 5, "ceil_mode", False))
        if fn is F.avg_pool2d:
            if _arg(node, 6, "divisor_override") is not None:
                raise _unsupported(node, "avg_pool2d(divisor_override=...)")
            k = _arg(node, 1, "kernel_size")
            return self._avgpool(x, k, _arg(node, 2, "stride") or k, _arg(node, 3, "padding", 0),
                                 _arg(node, 4, "ceil_mode", False), _arg(node, 5, "count_include_pad", True))
        if fn is F.adaptive_avg_pool2d:
            return self._adaptive(node, x, _arg(node, 1, "output_size"))
        if fn is F.pad:
            mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
            if mode != "constant" or (value not in (None, 0, 0.0)):
                raise _unsupported(node, f"F.pad(mode={mode!r}, value={value!r}); only zero padding is lowered")
            return ("pad", F.pad, (x, tuple(_arg(node, 1, "pad")), "constant", 0.0))
        if fn in _DROPOUT_FNS:
            if _arg(node, 2, "train" if fn is torch.dropout else "training", fn is not torch.dropout):
                raise _unsupported(node, "dropout with training=True")
            return None
        raise _unsupported(node, f"function {getattr(fn, '__module__', '')}.{getattr(fn, '__name__', fn)}")

    # -- tensor methods --------------------------------------------------------------------------
    def _method(self, node, name):
        x = node.args[0]
        if name in ("relu", "relu_"):
            return ("relu", torch.relu, (x,))
        if name in ("clamp", "clamp_", "clip", "clip_"):
            return self._clamp(node, x, _arg(node, 1, "min"), _arg(node, 2, "max"))
        if name in ("add", "add_", "__add__", "__iadd__"):
            return self._add(node, x, node.args[1], node.kwargs.get("alpha", 1))
        if name in ("view", "reshape"):
            return self._reshape(node, x)
        if name == "flatten":
            return ("flatten", torch.flatten, (x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)))
        if name == "mean" and _is_global_mean(node):
            shape = _shape(x)
            pooled = self._avgpool(x, shape[2:], shape[2:], 0, False, True)
            if _arg(node, 2, "keepdim", False):
                return pooled
            return ("mean_flat", pooled, None)
        if name in _REMOVED_METHODS:
            return None
        if name in ("size", "dim") or name == "shape":
            return ("shape_query", None, None)
        raise _unsupported(node, f"tensor method .{name}()")

    # -- shared builders -------------------------------------------------------------------------
    def _clamp(self, node, x, lo, hi):
        if not all(isinstance(v, (int, float)) for v in (lo, hi)):
            raise _unsupported(node, "clamp needs constant numeric min and max")
        if lo == 0 and hi == float("inf"):
            return ("relu", torch.relu, (x,))
        return ("clamp", torch.clamp, (x, float(lo), float(hi)))

    def _add(self, node, a, b, alpha):
        if alpha != 1:
            raise _unsupported(node, f"add with alpha={alpha}")
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            raise _unsupported(node, "add of a tensor and a constant (fold the constant into a bias)")
        return ("add", operator.add, (a, b))

    def _cat(self, node, xs, dim):
        shape = _shape(node)
        dim = dim % len(shape) if shape else dim
        if dim == 0:
            raise _unsupported(node, "cat along the batch dimension")
        return ("cat", torch.cat, (tuple(xs), dim))

    def _reshape(self, node, x):
        out, inp = _shape(node), _shape(x)
        if out is None or inp is None or out[0] != inp[0]:
            raise _unsupported(node, "reshape must keep the batch dimension first and unchanged")
        if len(out) == 2:
            return ("flatten", torch.flatten, (x, 1, -1))
        return ("reshape", torch.reshape, (x, (-1,) + tuple(out[1:])))

    @staticmethod
    def _maxpool(x, k, s, p, d, ceil):
        return ("maxpool", F.max_pool2d, (x, _pair(k), _pair(s if s is not None else k), _pair(p), _pair(d), bool(ceil)))

    @staticmethod
    def _avgpool(x, k, s, p, ceil, count_pad):
        return ("avgpool", F.avg_pool2d, (x, _pair(k), _pair(s if s is not None else k), _pair(p), bool(ceil), bool(count_pad)))

    def _adaptive(self, node, x, size):
        shape = _shape(x)
        if _pair(size) != (1, 1) or shape is None:
            raise _unsupported(node, f"AdaptiveAvgPool2d({size}); only output size 1 (global pooling) is lowered")
        return self._avgpool(x, shape[2:], shape[2:], 0, False, True)

    @staticmethod
    def _explicit_padding(node, m):
        if m.padding == "valid":
            return (0, 0)
        pads = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(p % 2 for p in pads):
            raise _unsupported(node, "padding='same' with an even kernel is asymmetric; use an explicit ZeroPad2d")
        return tuple(p // 2 for p in pads)


def canonicalize(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    ShapeProp(gm).propagate(ctx.example_input)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedOp(f"fxq compiles models with exactly one tensor input; this one has "
                            f"{len(placeholders)}: {[n.name for n in placeholders]}")
    rewriter = _Rewriter(gm)
    graph = gm.graph
    for node in list(graph.nodes):
        result = rewriter.canonical(node)
        if result is None:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        kind, fn, args = result
        if kind == "shape_query":
            continue            # left for dead-code elimination once static reshapes replace its users
        if kind == "mean_flat":
            pooled_kind, pool_fn, pool_args = fn
            with graph.inserting_before(node):
                pooled = graph.call_function(pool_fn, pool_args)
                pooled.meta.update(node.meta)
                pooled.meta[meta.KIND] = pooled_kind
                flat = graph.call_function(torch.flatten, (pooled, 1, -1))
                flat.meta.update(node.meta)
                flat.meta[meta.KIND] = "flatten"
            node.replace_all_uses_with(flat)
            graph.erase_node(node)
            continue
        if fn in (None, "module"):
            node.meta[meta.KIND] = kind
            continue
        with graph.inserting_before(node):
            new = graph.call_function(fn, args)
        new.meta.update(node.meta)
        new.meta[meta.KIND] = kind
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    for node in graph.nodes:
        if meta.KIND not in node.meta:
            raise _unsupported(node, "a shape query whose result is used as data")
    out = next(n for n in graph.nodes if n.op == "output")
    if not isinstance(out.args[0], fx.Node):
        raise UnsupportedOp("fxq compiles models with exactly one tensor output; this one returns "
                            f"{type(out.args[0]).__name__}")
    gm.delete_all_unused_submodules()
    return gm
