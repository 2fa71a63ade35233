"""Capture a model as a torch.fx graph, or say exactly which module and line could not be captured."""
from __future__ import annotations

import os
import traceback

import torch
import torch.fx as fx
from torch import nn

from . import meta
from .errors import TraceFailure, _source_from_stack

_TORCH_DIR = os.path.dirname(torch.__file__)
_FXQ_DIR = os.path.dirname(os.path.abspath(__file__))

TRACE_HINT = ("fxq captures the model with torch.fx symbolic tracing, which cannot follow Python control "
              "flow on tensor values (if/while on a tensor, len() or iteration over one, .item()). "
              "Rewrite that line with tensor ops (torch.where, masks, fixed loop counts), or move the "
              "decision out of forward().")


class _Tracer(fx.Tracer):
    """Keeps the stack of modules being traced so a failure can name the innermost one."""

    def __init__(self, leaf_types: tuple = ()):
        super().__init__()
        self.record_stack_traces = True
        self.fxq_module_stack: list[tuple[str, str]] = []
        self._extra_leaves = tuple(leaf_types)
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._extra_leaves) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.fxq_module_stack.append((self.path_of_module(m) or "<root>", type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:         # the innermost module is the first to see the failure
                self.failed_in = self.fxq_module_stack[-1]
            raise
        finally:
            self.fxq_module_stack.pop()


def _user_frame(tb) -> str | None:
    """The innermost frame of the failing traceback that is the user's code, not torch's or fxq's."""
    for frame in reversed(traceback.extract_tb(tb)):
        fn = os.path.abspath(frame.filename)
        if not fn.startswith(_TORCH_DIR) and not fn.startswith(_FXQ_DIR):
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return None


def trace(model: nn.Module, leaf_types: tuple = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` (eval mode) and record each node's source line."""
    if not isinstance(model, nn.Module):
        raise TraceFailure(f"fxq.compile expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        gm = fx.GraphModule(model, model.graph.__deepcopy__())
    else:
        tracer = _Tracer(leaf_types)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - any trace failure is reported with its location
            where = _user_frame(exc.__traceback__) or "unknown location"
            mod, typ = tracer.failed_in or ("<root>", type(model).__name__)
            raise TraceFailure(
                f"cannot trace module '{mod}' ({typ}) at {where}\n  cause: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}\n  hint: {TRACE_HINT}") from exc
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    for node in gm.graph.nodes:
        src = _source_from_stack(node.meta.get("stack_trace"))
        if src:
            node.meta[meta.SOURCE] = src
    return gm
