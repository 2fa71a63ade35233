"""Errors that name what was wrong: the pass, the node, the op and the user's source line."""
from __future__ import annotations


class FxqError(Exception):
    """Base of every error fxq raises on purpose."""


class TraceFailure(FxqError):
    """The model cannot be captured as a static graph."""


class UnsupportedOp(FxqError):
    """An op that fxq cannot lower; names the node and where it came from."""


class CalibrationError(FxqError):
    """Calibration data that would silently produce a wrong model."""


class VerifyError(FxqError):
    """An integer-IR invariant does not hold; names the node."""


class InputError(FxqError):
    """Run-time input that does not match the compiled model."""


class LoadError(FxqError):
    """A saved model that is corrupt, truncated or of another format."""


class ExportError(FxqError):
    """A model that cannot be exported exactly."""


class PassError(FxqError):
    """A pass failed; names the pass, the passes before it, and the node."""


def describe_node(node) -> str:
    """One line naming an fx node, its op and the user's source line when traced with stack traces."""
    from . import meta
    target = getattr(node.target, "__name__", node.target)
    where = node.meta.get(meta.SOURCE) or _source_from_stack(node.meta.get("stack_trace"))
    text = f"node '{node.name}' ({node.op} {target})"
    return f"{text} at {where}" if where else text


def _source_from_stack(stack: str | None) -> str | None:
    """The user's frame in an fx stack trace: the innermost one outside torch and fxq."""
    if not stack:
        return None
    import os
    import re

    import torch
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
    lines = stack.strip().splitlines()
    found = None
    for i, line in enumerate(lines):
        m = re.match(r'\s*File "([^"]+)", line (\d+)', line)
        if m and not os.path.abspath(m.group(1)).startswith(skip):
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            found = f"{m.group(1)}:{m.group(2)}: {code}"
    return found


class MissingExtra(FxqError, ImportError):
    """An optional dependency (an extra such as fxq[plot]) is not installed; says which to install."""
