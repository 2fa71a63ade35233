"""expand_attention: write fused attention out as the explicit ops fxq lowers, one graph shape for all spellings.

Runs right after tracing, before canonicalize. Trace with ``leaf_types=ATTENTION_LEAVES`` so each
``nn.MultiheadAttention`` call stays one call_module node.

Reads: the traced graph, ``ctx.example_input`` (static shapes, through ShapeProp) and the
MultiheadAttention modules. Writes: replaces every ``F.scaled_dot_product_attention`` call and every
``nn.MultiheadAttention`` call with these ops and nothing else

    torch.matmul(a, b)          torch.transpose(x, d0, d1)      operator.mul(x, python_float)
    torch.softmax(x, -1)        operator.add(x, mask)           torch.reshape(x, (-1, d1, ...))
    call_module nn.Linear       get_attr (a causal mask buffer)

in this order: ``scores = matmul(q, transpose(k, -2, -1))``; ``scores = mul(scores, scale)``; each
additive float mask ``scores = add(scores, mask)``; ``softmax(scores, -1)``; ``matmul(attn, v)``.
A MultiheadAttention adds its q/k/v projections as new nn.Linear submodules (named
``<module>.q_proj``, ``.k_proj``, ``.v_proj``, ``.out_proj``, copies of its weights) and splits heads with
``reshape(-1, T, H, Dh)`` + ``transpose(1, 2)``. ``is_causal=True`` adds a constant [1, (1,) L, S] buffer
registered on gm (``CAUSAL_MASK_VALUE`` above the diagonal, 0 elsewhere). New nodes carry the
replaced node's ``stack_trace`` and ``meta[SOURCE]``. Removes the replaced nodes and modules.

Raises UnsupportedOp naming the node for: boolean masks, dropout, is_causal/scale/dropout_p that are
not constants, enable_gqa, and MultiheadAttention with batch_first=False, training mode, add_bias_kv,
add_zero_attn, unbatched input, or its attention-weights output used.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxq import meta
from fxq.context import CompileContext
from fxq.errors import UnsupportedOp, describe_node

# Pass as fxq.trace.trace(model, leaf_types=ATTENTION_LEAVES) so these stay one node each.
ATTENTION_LEAVES = (nn.MultiheadAttention,)

# Added above the diagonal of the causal mask. Not -inf: fxq quantizes the scores after the mask is
# added, and an infinite (or float-minimum) value gives an observer an infinite range, NaN steps
# (inf - inf) or overflow to -inf when added to a negative score. -1e4 is finite in float16 too, saturates
# to the lowest code of any clipped format (whose softmax weight is still ~0), and exp(-1e4 + s) underflows
# to exactly 0 in float32 whenever |s| < ~9900, so the float output equals the -inf mask's.
CAUSAL_MASK_VALUE = -1e4

_SDPA_FNS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_META_KEYS = ("stack_trace", meta.SOURCE)
_MASK_FIX = ("convert it to an additive float mask (0.0 where attended, a large negative value such as "
             f"{CAUSAL_MASK_VALUE:g} where masked)")
# The two APIs read a boolean mask oppositely: SDPA's True attends, MultiheadAttention's True masks.
_BOOL_FIX = {"sdpa": f"(~mask).float() * {CAUSAL_MASK_VALUE:g}", "mha": f"mask.float() * {CAUSAL_MASK_VALUE:g}"}


def _unsupported(node: fx.Node, what: str, fix: str) -> UnsupportedOp:
    return UnsupportedOp(f"{describe_node(node)}: {what}; {fix}")


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _tensor_meta(node: fx.Node, value, what: str):
    tm = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    if tm is None or not hasattr(tm, "shape"):
        raise _unsupported(node, f"{what} is not a tensor of known shape",
                           "pass a tensor computed in forward() or a registered buffer")
    return tm


def _constant(node: fx.Node, value, name: str):
    if isinstance(value, fx.Node):
        raise _unsupported(node, f"{name} is computed at run time ({value.name})",
                           f"pass {name} as a Python constant")
    return value


class _Emitter:
    """Inserts nodes before ``anchor``, each carrying the anchor's source-location metadata."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node):
        self.gm, self.graph, self.anchor = gm, gm.graph, anchor

    def _stamp(self, new: fx.Node) -> fx.Node:
        for key in _META_KEYS:
            if key in self.anchor.meta:
                new.meta[key] = self.anchor.meta[key]
        return new

    def fn(self, target, *args) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            return self._stamp(self.graph.call_function(target, tuple(args)))

    def module(self, name: str, x: fx.Node) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            return self._stamp(self.graph.call_module(name, (x,)))

    def attr(self, name: str) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            return self._stamp(self.graph.get_attr(name))

    def attention(self, q, k, v, scale: float, masks) -> fx.Node:
        """softmax(q @ k^T * scale + masks) @ v, in fxq's vocabulary."""
        scores = self.fn(torch.matmul, q, self.fn(torch.transpose, k, -2, -1))
        scores = self.fn(operator.mul, scores, float(scale))
        for mask in masks:
            scores = self.fn(operator.add, scores, mask)
        return self.fn(torch.matmul, self.fn(torch.softmax, scores, -1), v)


def _keep_shape(old: fx.Node, new: fx.Node) -> None:
    """The replacement computes the same tensor: a later attention reading it needs its shape."""
    if "tensor_meta" in old.meta:
        new.meta["tensor_meta"] = old.meta["tensor_meta"]


def _check_mask(node: fx.Node, mask, name: str, api: str):
    """None or a float tensor node; anything else raises."""
    if mask is None:
        return None
    dtype = _tensor_meta(node, mask, name).dtype
    if dtype == torch.bool:
        raise _unsupported(node, f"{name} is a boolean mask", f"{_MASK_FIX}, e.g. {_BOOL_FIX[api]}")
    if not dtype.is_floating_point:
        raise _unsupported(node, f"{name} has dtype {dtype}", _MASK_FIX)
    return mask


def _unique_attr(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _causal_mask(gm: fx.GraphModule, cache: dict, L: int, S: int, dtype, rank: int = 4) -> str:
    """Name of a [1, (1,) L, S] additive buffer: CAUSAL_MASK_VALUE where key j > query i (torch's top-left tril)."""
    key = (L, S, dtype, rank)
    if key not in cache:
        # [1, ..., L, S] of the scores' rank: constants carry a leading batch dim of 1
        mask = torch.triu(torch.full((L, S), CAUSAL_MASK_VALUE, dtype=dtype), diagonal=1)
        mask = mask.reshape((1,) * (rank - 2) + (L, S))
        name = _unique_attr(gm, "fxq_causal_mask")
        gm.register_buffer(name, mask)
        cache[key] = name
    return cache[key]


def _expand_sdpa(gm: fx.GraphModule, node: fx.Node, causal_cache: dict) -> None:
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = _check_mask(node, _arg(node, 3, "attn_mask"), "attn_mask", "sdpa")
    dropout_p = _constant(node, _arg(node, 4, "dropout_p", 0.0), "dropout_p")
    is_causal = _constant(node, _arg(node, 5, "is_causal", False), "is_causal")
    scale = _constant(node, _arg(node, 6, "scale", None), "scale")
    gqa = _constant(node, _arg(node, 7, "enable_gqa", False), "enable_gqa")
    if dropout_p != 0.0:
        raise _unsupported(node, f"scaled_dot_product_attention with dropout_p={dropout_p}",
                           "fxq compiles eval-mode models: pass dropout_p=0.0 "
                           "(e.g. `self.p if self.training else 0.0`)")
    if gqa:
        raise _unsupported(node, "scaled_dot_product_attention with enable_gqa=True",
                           "repeat the key/value heads to the query's head count and pass enable_gqa=False")
    q_shape = tuple(_tensor_meta(node, q, "query").shape)
    k_shape = tuple(_tensor_meta(node, k, "key").shape)
    masks = [mask] if mask is not None else []
    em = _Emitter(gm, node)
    if is_causal:
        if mask is not None:
            raise _unsupported(node, "both attn_mask and is_causal=True",
                               "pass one: add the causal mask into attn_mask, or drop attn_mask")
        dtype = _tensor_meta(node, q, "query").dtype
        masks = [em.attr(_causal_mask(gm, causal_cache, q_shape[-2], k_shape[-2], dtype, len(q_shape)))]
    if scale is None:
        scale = 1.0 / math.sqrt(q_shape[-1])
    out = em.attention(q, k, v, scale, masks)
    _keep_shape(node, out)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.eval()


def _mha_linears(m: nn.MultiheadAttention) -> dict[str, nn.Linear]:
    E = m.embed_dim
    b = m.in_proj_bias
    bias = [None] * 3 if b is None else [b[:E], b[E:2 * E], b[2 * E:]]
    if m._qkv_same_embed_dim:
        w = m.in_proj_weight
        weights = [w[:E], w[E:2 * E], w[2 * E:]]
    else:
        weights = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
    out = {f"{role}_proj": _linear(wi.detach(), None if bi is None else bi.detach())
           for role, wi, bi in zip("qkv", weights, bias)}
    out["out_proj"] = _linear(m.out_proj.weight.detach(),
                              None if m.out_proj.bias is None else m.out_proj.bias.detach())
    return out


def _set_module(gm: fx.GraphModule, qualname: str, module: nn.Module) -> None:
    parent_name, _, attr = qualname.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, module)


def _install_linears(gm: fx.GraphModule, target: str, m: nn.MultiheadAttention) -> dict[str, str]:
    """Adds the projections; returns role -> submodule name. Under ``target`` (replacing the MHA by a
    plain container) unless another node reaches inside the MHA, then flat names beside it."""
    linears = _mha_linears(m)
    inside = [n for n in gm.graph.nodes if n.op in ("get_attr", "call_module")
              and isinstance(n.target, str) and n.target.startswith(target + ".")]
    if inside:
        prefix = target.replace(".", "_") + "_"
        names = {role: _unique_attr(gm, prefix + role) for role in linears}
    else:
        _set_module(gm, target, nn.Module())
        names = {role: f"{target}.{role}" for role in linears}
    for role, lin in linears.items():
        if not gm.add_submodule(names[role], lin):
            raise UnsupportedOp(f"expand_attention: cannot add submodule '{names[role]}'")
    return names


def _mha_outputs(node: fx.Node, name: str) -> fx.Node | None:
    """Checks the MHA node is only unpacked; returns the getitem(node, 0) node (None if unused)."""
    out = None
    for user in list(node.users):
        idx = user.args[1] if user.op == "call_function" and user.target is operator.getitem else None
        if idx not in (0, 1):
            raise _unsupported(node, f"the output of nn.MultiheadAttention '{name}' is used as a tuple "
                                     f"by '{user.name}'", "unpack it as `out, _ = attn(q, k, v, need_weights=False)`")
        if idx == 1:
            if user.users:
                raise _unsupported(node, f"the attention-weights output of nn.MultiheadAttention '{name}' is used "
                                         f"(by {', '.join(u.name for u in user.users)})",
                                   "fxq computes only the attention output: call it with need_weights=False "
                                   "and do not use the weights")
        else:
            out = user
    return out


def _check_mha(node: fx.Node, name: str, m: nn.MultiheadAttention) -> None:
    what = f"nn.MultiheadAttention '{name}'"
    if not m.batch_first:
        raise _unsupported(node, f"{what} has batch_first=False",
                           "construct it with nn.MultiheadAttention(..., batch_first=True) and pass [N, T, E] tensors")
    if m.training:
        raise _unsupported(node, f"{what} is in training mode", "call model.eval() before fxq.compile")
    if m.bias_k is not None or m.bias_v is not None:
        raise _unsupported(node, f"{what} has add_bias_kv=True",
                           "construct it with add_bias_kv=False (append the bias as an extra key/value token instead)")
    if m.add_zero_attn:
        raise _unsupported(node, f"{what} has add_zero_attn=True", "construct it with add_zero_attn=False")


def _expand_mha(gm: fx.GraphModule, node: fx.Node, m: nn.MultiheadAttention, installed: dict) -> None:
    name = node.target
    _check_mha(node, name, m)
    result = _mha_outputs(node, name)
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    kpm = _check_mask(node, _arg(node, 3, "key_padding_mask"), "key_padding_mask", "mha")
    attn_mask = _check_mask(node, _arg(node, 5, "attn_mask"), "attn_mask", "mha")
    _constant(node, _arg(node, 7, "is_causal", False), "is_causal")
    # is_causal=True is only a hint in nn.MultiheadAttention: torch requires attn_mask with it and
    # documents that attn_mask is then the causal mask, so the mask alone is the semantics.
    graph = gm.graph
    if result is None or not result.users:      # output unused: drop the call
        for user in list(node.users):
            graph.erase_node(user)
        graph.erase_node(node)
        return
    shapes = {}
    for role, x in (("query", q), ("key", k), ("value", v)):
        shapes[role] = tuple(_tensor_meta(node, x, role).shape)
        if len(shapes[role]) != 3:
            raise _unsupported(node, f"nn.MultiheadAttention '{name}' gets an unbatched or {len(shapes[role])}-d "
                                     f"{role} of shape {list(shapes[role])}", "pass batched [N, T, E] tensors")
    H, E = m.num_heads, m.embed_dim
    Dh = E // H
    T, S = shapes["query"][1], shapes["key"][1]
    if name not in installed:
        installed[name] = _install_linears(gm, name, m)
    names = installed[name]
    em = _Emitter(gm, node)

    def heads(x, role, length):
        y = em.module(names[f"{role}_proj"], x)
        return em.fn(torch.transpose, em.fn(torch.reshape, y, (-1, length, H, Dh)), 1, 2)

    qh, kh, vh = heads(q, "q", T), heads(k, "k", S), heads(v, "v", S)
    masks = []
    if attn_mask is not None:
        shape = tuple(_tensor_meta(node, attn_mask, "attn_mask").shape)
        if len(shape) == 3:          # [N * H, T, S] -> [N, H, T, S]; 2-d [T, S] broadcasts as it is
            attn_mask = em.fn(torch.reshape, attn_mask, (-1, H, T, S))
        masks.append(attn_mask)
    if kpm is not None:              # [N, S] -> [N, 1, 1, S]
        masks.append(em.fn(torch.reshape, kpm, (-1, 1, 1, S)))
    ctx_heads = em.attention(qh, kh, vh, 1.0 / math.sqrt(Dh), masks)
    merged = em.fn(torch.reshape, em.fn(torch.transpose, ctx_heads, 1, 2), (-1, T, E))
    out = em.module(names["out_proj"], merged)
    _keep_shape(result, out)
    result.replace_all_uses_with(out)
    for user in list(node.users):
        graph.erase_node(user)
    graph.erase_node(node)


def expand_attention(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    modules = dict(gm.named_modules())
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _SDPA_FNS]
    mha = [n for n in gm.graph.nodes
           if n.op == "call_module" and isinstance(modules.get(n.target), nn.MultiheadAttention)]
    if not sdpa and not mha:
        return gm
    example = ctx.example_input
    ShapeProp(gm).propagate(*(example if isinstance(example, (tuple, list)) else (example,)))
    causal_cache: dict = {}
    installed: dict = {}
    for node in sdpa:
        _expand_sdpa(gm, node, causal_cache)
    for node in mha:
        _expand_mha(gm, node, modules[node.target], installed)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
