"""token_masks: what a text encoder computes from its token ids becomes explicit masked ops.

A BERT-style encoder takes integer token ids. Besides the embedding lookup, it derives a validity
mask (``ids != pad``) and uses it twice: as an additive attention mask before a softmax
(``softmax(scores + f(valid))``) and to average only the valid tokens
(``(x * m).sum(1) / m.sum(1).clamp(min=1)``). Such mask arithmetic has no quantization format; this
pass finds the one comparison the mask comes from, evaluates the mask's two values (valid, padding)
and rewrites the uses as ``islands.TokenMaskedSoftmax(scores, valid)`` and
``islands.masked_mean(x, valid)``. Runs before canonicalize.

Reads: ``ctx.example_input`` (integer: token ids). Writes: the rewritten nodes; ``meta[KIND]`` =
"token_mask" on the comparison. Raises UnsupportedOp, naming the node, for any other use of the ids.
PIPELINE runs it only when the model input is token ids (an integer tensor).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxq import islands, meta
from fxq.context import CompileContext
from fxq.errors import UnsupportedOp, describe_node

# Every spelling of a comparison, and the canonical operator.* function it becomes.
_COMPARISONS = {f: op for op in (operator.ne, operator.eq, operator.gt, operator.ge, operator.lt, operator.le)
                for f in (op, getattr(torch, op.__name__))}
_COMPARISON_METHODS = {name: op for op in set(_COMPARISONS.values())
                       for name in (op.__name__, f"__{op.__name__}__")}
SUPPORTED = ("fxq lowers token ids used by nn.Embedding and by one comparison (ids != pad) whose result "
             "feeds an additive attention mask before a softmax or a mean over the valid tokens")


def _unsupported(node: fx.Node, why: str) -> UnsupportedOp:
    return UnsupportedOp(f"{describe_node(node)}: {why}.\n  {SUPPORTED}")


def _run(nodes: list[fx.Node], env: dict) -> dict:
    """Evaluate the mask-only nodes ``nodes`` given ``env`` (the comparison's value)."""
    load = lambda a: env[a] if isinstance(a, fx.Node) else a  # noqa: E731
    for n in nodes:
        args, kwargs = fx.node.map_aggregate(n.args, load), fx.node.map_aggregate(n.kwargs, load)
        if n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            raise _unsupported(n, f"a {n.op} node inside the mask arithmetic")
    return env


class _Masks:
    def __init__(self, gm: fx.GraphModule, ids: fx.Node):
        self.gm, self.ids = gm, ids
        modules = dict(gm.named_modules())
        self.domain: list[fx.Node] = []          # nodes computed from the ids alone (not through an embedding)
        inside = {ids}
        for n in gm.graph.nodes:
            if n is ids or n.op == "output":
                continue
            if n.all_input_nodes and all(a in inside for a in n.all_input_nodes):
                if n.op == "call_module" and isinstance(modules[n.target], nn.Embedding):
                    continue
                inside.add(n)
                self.domain.append(n)
        compares = [n for n in self.domain if ids in n.all_input_nodes]
        for n in compares:                          # ids.ne(0), torch.ne(ids, 0) -> operator.ne(ids, 0)
            if n.op == "call_method" and n.target in _COMPARISON_METHODS:
                n.op, n.target = "call_function", _COMPARISON_METHODS[n.target]
            elif n.op == "call_function" and n.target in _COMPARISONS:
                n.target = _COMPARISONS[n.target]
        others = [n for n in compares if n.op != "call_function" or n.target not in _COMPARISONS
                  or len(n.args) != 2 or n.args[0] is not ids or not isinstance(n.args[1], (int, float))]
        if others:
            raise _unsupported(others[0], "the token ids are used by something other than an nn.Embedding or a "
                                          "comparison with a constant")
        if len(compares) > 1:
            raise _unsupported(compares[1], "a second comparison of the token ids (one validity mask is lowered)")
        self.compare = compares[0] if compares else None
        self.inside = inside
        self.length = tuple(ids.meta["tensor_meta"].shape)[1]

    def values(self, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor]:
        """``node``'s value when every token is valid, and when none is (batch of 1)."""
        path = [n for n in self.domain if n is not self.compare]
        out = []
        for v in (True, False):
            env = _run(path, {self.compare: torch.full((1, self.length), v)})
            out.append(env[node])
        return out[0], out[1]

    def constant(self, node: fx.Node, value: torch.Tensor, what: str) -> float:
        flat = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
        if flat.numel() == 0 or not bool((flat == flat[0]).all()):
            raise _unsupported(node, f"the {what} takes different values at different positions")
        return float(flat[0])


def _exits(masks: _Masks) -> list[tuple[fx.Node, fx.Node]]:
    """(mask node, the first node outside the mask arithmetic that reads it)."""
    out = []
    for n in masks.domain:
        out += [(n, u) for u in n.users if u not in masks.inside]
    return out


def _mean_pattern(mul: fx.Node, mask: fx.Node):
    """mul = x * m -> s = mul.sum(1) -> s / count: returns (x, div node) or None."""
    if mul.op != "call_function" or mul.target not in (operator.mul, torch.mul) or len(mul.users) != 1:
        return None
    (s,) = mul.users
    dims = s.args[1] if len(s.args) > 1 else s.kwargs.get("dim")
    if not (s.op == "call_method" and s.target == "sum" and dims in (1, (1,), [1])) or len(s.users) != 1:
        return None
    (div,) = s.users
    if div.op != "call_function" or div.target not in (operator.truediv, torch.div) or div.args[0] is not s:
        return None
    x = mul.args[0] if mul.args[1] is mask else mul.args[1]
    return x, div


def token_masks(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    example = ctx.example_input
    (ids,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ShapeProp(gm).propagate(example)
    masks = _Masks(gm, ids)
    if masks.compare is None:
        return gm
    valid = masks.compare
    valid.meta[meta.KIND] = "token_mask"
    for mask, user in _exits(masks):
        if user.op == "call_function" and user.target in (operator.add, torch.add) and len(user.users) == 1 \
                and next(iter(user.users)).target in (torch.softmax, torch.nn.functional.softmax):
            (softmax,) = user.users
            on_valid, on_invalid = masks.values(mask)
            shape = tuple(on_valid.shape)
            if len(shape) != 4 or shape[1:3] != (1, 1):
                raise _unsupported(user, f"an attention mask of shape {list(shape)}; fxq lowers key masks "
                                         f"[N, 1, 1, T] (one value per key token)")
            scores = user.args[0] if user.args[1] is mask else user.args[1]
            name = f"{softmax.name}_token_masked"
            gm.add_submodule(name, islands.TokenMaskedSoftmax(masks.constant(user, on_valid, "attention mask"),
                                                              masks.constant(user, on_invalid, "attention mask")))
            with gm.graph.inserting_before(softmax):
                fused = gm.graph.call_module(name, (scores, valid))
            fused.meta.update(softmax.meta)
            softmax.replace_all_uses_with(fused)
            gm.graph.erase_node(softmax)
            gm.graph.erase_node(user)
            continue
        pattern = _mean_pattern(user, mask)
        if pattern is not None:
            on_valid, on_invalid = masks.values(mask)
            if (masks.constant(user, on_valid, "pooling weight"), masks.constant(user, on_invalid, "pooling weight")) \
                    != (1.0, 0.0):
                raise _unsupported(user, "pooling weights other than 1 for valid tokens and 0 for padding")
            x, div = pattern
            with gm.graph.inserting_before(div):
                pooled = gm.graph.call_function(islands.masked_mean, (x, valid))
            pooled.meta.update(div.meta)
            div.replace_all_uses_with(pooled)
            continue
        if user.op == "call_function" and user.target in (operator.truediv, torch.div):
            continue                           # the count of a mean already rewritten
        raise _unsupported(user, "a value computed from the token ids is used here")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
