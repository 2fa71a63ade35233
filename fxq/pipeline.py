"""Runs passes in order; a failure names the pass, the passes before it, and the cause."""
from __future__ import annotations

import torch.fx as fx

from .context import CompileContext
from .errors import FxqError, PassError


def run_passes(gm: fx.GraphModule, ctx: CompileContext, passes) -> fx.GraphModule:
    done: list[str] = []
    for p in passes:
        try:
            gm = p(gm, ctx)
            gm.graph.lint()
            gm.recompile()
        except FxqError as exc:
            exc.args = (f"[pass {p.__name__}] {exc.args[0] if exc.args else ''}",) + exc.args[1:]
            raise
        except Exception as exc:  # noqa: BLE001 - an unexpected failure still names its pass
            after = ", ".join(done) or "nothing"
            raise PassError(f"pass '{p.__name__}' (after {after}) failed: {type(exc).__name__}: {exc}") from exc
        done.append(p.__name__)
    return gm
