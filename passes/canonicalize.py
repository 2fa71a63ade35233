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
    matmul   torch.matmul(a, b)                 permute  torch.permute(x, dims)   (transpose; batch stays first)
    select   torch.select(x, dim, i)            (x[:, i]: one index along a non-batch dim)
    softmax  fxq.islands.softmax(x)             gelu     fxq.islands.gelu(x, approximate)
             (or an islands.TokenMaskedSoftmax module (scores, valid), from passes/token_masks)
    embedding  nn.Embedding module              token_mask  ids != pad (passes/token_masks)
    masked_mean  fxq.islands.masked_mean(x, valid)   l2_normalize  fxq.islands.l2_normalize(x, eps)
    layer_norm  fxq.islands.LayerNorm module    (nn.LayerNorm over the last dim)
    mul_const  operator.mul(x, c)               (x * c, x / c with a Python number c; folded later)
    const    get_attr of a parameter/buffer     expand_batch  fxq.tensor_ops.expand_batch(c, like)
Softmax, GELU and LayerNorm are computed in float64 (fxq.islands), as every executor computes them.

Raises UnsupportedOp naming the node, its op and the user's source line for anything else.
Over 400 lines because it is the front end's one table of spellings, read top to bottom.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxq import islands, meta
from fxq.context import CompileContext
from fxq.errors import UnsupportedOp, describe_node
from fxq.tensor_ops import expand_batch
from fxq.walk import attr_value

SUPPORTED_TEXT = ("Conv2d, Linear, BatchNorm (after a conv/linear), ReLU, ReLU6/Hardtanh/clamp, MaxPool2d, "
                  "AvgPool2d, AdaptiveAvgPool2d(1), flatten/view/reshape, residual add, cat, ZeroPad2d, "
                  "Identity, eval-mode Dropout, matmul/@, transpose/permute (batch first), x[:, i], softmax and "
                  "GELU and LayerNorm over the last dim, multiplication by a constant, batch-1 parameters "
                  "(class token, position embedding) with expand")

_RELU_FNS = {torch.relu, F.relu, torch.relu_, getattr(F, "relu_", None)} - {None}
_ADD_FNS = {operator.add, operator.iadd, torch.add}
_CAT_FNS = {torch.cat, torch.concat, getattr(torch, "concatenate", torch.cat)}
_DROPOUT_FNS = {F.dropout, F.dropout2d, torch.dropout}
_DROPOUT_MODS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_REMOVED_METHODS = {"contiguous"}
_MATMUL_FNS = {torch.matmul, operator.matmul, torch.bmm}
_MUL_FNS = {operator.mul, torch.mul}
_DIV_FNS = {operator.truediv, torch.div, torch.true_divide}
_SOFTMAX_FNS = {torch.softmax, F.softmax}


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


def _is_shape_node(node) -> bool:
    """x.shape / x.size(): a node whose value is a torch.Size, not a tensor."""
    return isinstance(node, fx.Node) and ((node.op == "call_function" and node.target is getattr and node.args[1] == "shape")
                                         or (node.op == "call_method" and node.target == "size"))


def _shape_owner(size) -> fx.Node | None:
    """The tensor whose batch size ``size`` reads (x.shape[0] or x.size(0)), else None."""
    if not isinstance(size, fx.Node):
        return None
    if size.op == "call_method" and size.target == "size" and _arg(size, 1, "dim") == 0:
        return size.args[0]
    if size.op == "call_function" and size.target is operator.getitem and size.args[1] == 0 and _is_shape_node(size.args[0]):
        return size.args[0].args[0]
    return None


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
        if node.meta.get(meta.KIND) == "token_mask":           # passes/token_masks found it
            return ("token_mask", "module", None)
        if node.op == "call_function" and node.target is islands.masked_mean:
            return ("masked_mean", "module", None)
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
        if node.op == "get_attr":
            return self._const(node)
        raise _unsupported(node, f"graph node of kind {node.op!r}")

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
        if isinstance(m, nn.LayerNorm):
            return self._layer_norm(node, m)
        if isinstance(m, islands.TokenMaskedSoftmax):
            return ("softmax", "module", None)
        if isinstance(m, nn.Embedding):
            if m.max_norm is not None:
                raise _unsupported(node, "nn.Embedding(max_norm=...) renormalises rows at lookup time")
            return ("embedding", "module", None)
        if isinstance(m, nn.GELU):
            return ("gelu", islands.gelu, (x, m.approximate))
        if isinstance(m, nn.Softmax):
            return self._softmax(node, x, m.dim)
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
        if fn in _MATMUL_FNS:
            return self._matmul(node, node.args[0], node.args[1])
        if fn is torch.transpose:
            return self._transpose(node, x, _arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
        if fn is torch.permute:
            return self._permute(node, x, _arg(node, 1, "dims"))
        if fn in _SOFTMAX_FNS:
            return self._softmax(node, x, _arg(node, 1, "dim"))
        if fn is F.gelu:
            return ("gelu", islands.gelu, (x, node.kwargs.get("approximate", "none")))
        if fn is F.normalize:
            p, dim = _arg(node, 1, "p", 2.0), _arg(node, 2, "dim", 1)
            rank = len(_shape(node))
            if p != 2 or dim % rank != rank - 1:
                raise _unsupported(node, f"F.normalize(p={p}, dim={dim}); fxq lowers the L2 norm over the last dim")
            return ("l2_normalize", islands.l2_normalize, (x, float(_arg(node, 3, "eps", 1e-12))))
        if fn is F.layer_norm:
            raise _unsupported(node, "F.layer_norm; use nn.LayerNorm (fxq reads its weight, bias and eps)")
        if fn in _MUL_FNS:
            return self._scale(node, node.args[0], node.args[1], divide=False)
        if fn in _DIV_FNS:
            if node.kwargs.get("rounding_mode") is not None:
                raise _unsupported(node, "division with a rounding_mode")
            return self._scale(node, node.args[0], node.args[1], divide=True)
        if fn is getattr and node.args[1] == "shape":
            return ("shape_query", None, None)
        if fn is operator.getitem:
            return self._getitem(node, x, node.args[1])
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
        if name == "matmul":
            return self._matmul(node, x, node.args[1])
        if name == "transpose":
            return self._transpose(node, x, _arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
        if name == "permute":
            dims = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else node.args[1]
            return self._permute(node, x, dims)
        if name == "softmax":
            return self._softmax(node, x, _arg(node, 1, "dim"))
        if name in ("mul", "__mul__"):
            return self._scale(node, x, node.args[1], divide=False)
        if name in ("div", "__truediv__"):
            return self._scale(node, x, node.args[1], divide=True)
        if name == "expand":
            return self._expand(node, x)
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

    def _const(self, node):
        shape = _shape(node)
        if shape is None or len(shape) < 2 or shape[0] != 1:
            raise _unsupported(node, f"parameter/buffer {node.target!r} of shape {list(shape or ())} used as data; "
                                     f"fxq lowers such constants only with a leading batch dim of 1 (a class token "
                                     f"[1, 1, D], a position embedding [1, T, D])")
        return ("const", "module", None)

    def _matmul(self, node, a, b):
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            raise _unsupported(node, "matmul with a constant operand (use nn.Linear for a product with weights)")
        sa, sb = _shape(a), _shape(b)
        if sa is None or sb is None or len(sa) < 3 or len(sa) != len(sb) or sa[0] != sb[0]:
            raise _unsupported(node, f"matmul of shapes {list(sa or ())} and {list(sb or ())}; fxq lowers products of "
                                     f"two activations with the same rank (3 or more) and the batch dim first")
        return ("matmul", torch.matmul, (a, b))

    def _permute(self, node, x, dims):
        rank = len(_shape(node))
        dims = tuple(int(d) % rank for d in dims)
        if dims[0] != 0:
            raise _unsupported(node, f"permute {list(dims)} moves the batch dimension; it must stay first")
        return ("permute", torch.permute, (x, dims))

    def _transpose(self, node, x, d0, d1):
        rank = len(_shape(node))
        dims = list(range(rank))
        dims[d0 % rank], dims[d1 % rank] = dims[d1 % rank], dims[d0 % rank]
        return self._permute(node, x, dims)

    def _softmax(self, node, x, dim):
        rank = len(_shape(node))
        if dim is None or int(dim) % rank != rank - 1:
            raise _unsupported(node, f"softmax over dim {dim}; fxq lowers softmax over the last dim only")
        return ("softmax", islands.softmax, (x,))

    def _layer_norm(self, node, m):
        if len(m.normalized_shape) != 1:
            raise _unsupported(node, f"LayerNorm over {list(m.normalized_shape)}; fxq lowers the last dim only")
        parent, _, attr = node.target.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, attr, islands.LayerNorm.of(m))
        return ("layer_norm", "module", None)

    def _scale(self, node, a, b, divide: bool):
        if isinstance(a, (int, float)) and not divide:
            a, b = b, a
        if not (isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool)):
            why = "division" if divide else "multiplication"
            raise _unsupported(node, f"{why} of two tensors (fxq lowers a tensor times a Python number)")
        c = 1.0 / float(b) if divide else float(b)
        return ("mul_const", operator.mul, (a, c))

    def _expand(self, node, x):
        if x.op != "get_attr" or _shape(x)[0] != 1:
            raise _unsupported(node, "expand of anything but a batch-1 parameter (a class token)")
        size = list(node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else node.args[1])
        if list(_shape(node)[1:]) != list(_shape(x)[1:]):
            raise _unsupported(node, "expand may only repeat the batch dimension")
        like = _shape_owner(size[0])
        if like is None:
            raise _unsupported(node, "expand's batch size must be another tensor's x.shape[0] or x.size(0)")
        return ("expand_batch", expand_batch, (x, like))

    def _getitem(self, node, x, index):
        if x.meta.get(meta.KIND) == "shape_query" or _is_shape_node(x):
            return ("shape_query", None, None)
        shape = _shape(x)
        index = index if isinstance(index, tuple) else (index,)
        ints = [(i, v) for i, v in enumerate(index) if isinstance(v, int)]
        full = all(v == slice(None) for i, v in enumerate(index) if not isinstance(v, int))
        if shape is None or len(ints) != 1 or not full or ints[0][0] == 0:
            raise _unsupported(node, f"indexing {index}; fxq lowers x[:, i] (one integer index, not on the batch dim)")
        dim, i = ints[0]
        return ("select", torch.select, (x, dim, i % shape[dim]))

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


def _fuse_softmax_masks(gm: fx.GraphModule) -> None:
    """softmax(scores + constant mask) becomes one MaskedSoftmax island holding the mask: quantizing a
    -1e4 mask with the scores would leave them no resolution."""
    for node in list(gm.graph.nodes):
        if node.meta.get(meta.KIND) != "softmax":
            continue
        add = node.args[0]
        if add.meta.get(meta.KIND) != "add" or len(add.users) != 1:
            continue
        consts = [a for a in add.args[:2] if a.meta.get(meta.KIND) == "const"]
        if len(consts) != 1:
            continue
        (mask,) = consts
        scores = add.args[0] if add.args[1] is mask else add.args[1]
        value = attr_value(gm, mask.target)
        name = f"{node.name}_masked"
        gm.add_submodule(name, islands.MaskedSoftmax(value))
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_module(name, (scores,))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        gm.graph.erase_node(add)
        if not mask.users:
            gm.graph.erase_node(mask)


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
        if fn is torch.permute and args[1] == tuple(range(len(args[1]))):
            node.replace_all_uses_with(args[0])          # an identity permute
            graph.erase_node(node)
            continue
        with graph.inserting_before(node):
            new = graph.call_function(fn, args)
        new.meta.update(node.meta)
        new.meta[meta.KIND] = kind
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    _fuse_softmax_masks(gm)
    for node in graph.nodes:
        if meta.KIND not in node.meta:
            raise _unsupported(node, "a shape query whose result is used as data")
    out = next(n for n in graph.nodes if n.op == "output")
    if not isinstance(out.args[0], fx.Node):
        raise UnsupportedOp("fxq compiles models with exactly one tensor output; this one returns "
                            f"{type(out.args[0]).__name__}")
    _refuse_shared_layers(graph)
    gm.delete_all_unused_submodules()
    return gm


def _refuse_shared_layers(graph: fx.Graph) -> None:
    """A conv/linear module called twice would need one weight format for two inputs of different
    formats; say so rather than fail later inside a pass."""
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.meta.get(meta.KIND) in meta.WEIGHTED:
            calls.setdefault(node.target, []).append(node)
    for target, nodes in calls.items():
        if len(nodes) > 1:
            raise UnsupportedOp(f"{describe_node(nodes[1])}: module {target!r} is called {len(nodes)} times (nodes "
                                         f"{', '.join(n.name for n in nodes)}); fxq gives every call of a conv/linear "
                                         f"its own quantized weights and formats: give each call its own module "
                                         f"(copy.deepcopy)")
