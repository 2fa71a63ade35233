"""Runs passes in order; a failure names the pass, the passes before it, and the cause.

A pipeline entry is a ``PassSpec``: the pass function plus what it declares, namely the passes and
node-metadata keys it requires, the keys it writes, and when it runs (a predicate on the context; its
docstring is the condition in words, as ``fxq passes`` prints it). The runner skips an entry whose
``when`` is false. With checks on (``FXQ_CHECK_PASSES=1``, which the test suite sets, or
``run_passes(check=True)``) it also holds every pass to its declarations and raises PassError naming
the pass and the key:

- before the pass: each required pass ran earlier in this run, each required key is on some node;
- after it, if it changed the graph or any node's metadata: each key in ``writes`` is on some node,
  and every ``fxq.*`` key it set (a value no node held under that key before) is in ``writes`` or
  ``may_write`` (keys it sets only where the graph calls for them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from .context import CompileContext
from .errors import FxqError, PassError

CHECK_ENV = "FXQ_CHECK_PASSES"
_META_PREFIX = "fxq."


@dataclass(frozen=True)
class PassSpec:
    """One pipeline entry: ``fn(gm, ctx) -> gm`` and its declarations (module docstring)."""
    fn: Callable[[fx.GraphModule, CompileContext], fx.GraphModule]
    requires: tuple[str, ...] = ()     # pass names, or meta keys ("fxq.*") some node must carry
    writes: tuple[str, ...] = ()       # meta keys some node carries after the pass, when it changed anything
    may_write: tuple[str, ...] = ()    # meta keys it sets only where the graph has what they describe
    when: Callable[[CompileContext], bool] | None = None   # None: always; its docstring says when in words

    def __post_init__(self):
        if self.when is not None and not (self.when.__doc__ or "").strip():
            raise TypeError(f"pass {self.name}: its 'when' predicate needs a docstring (the condition in words)")

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def when_text(self) -> str:
        return "always" if self.when is None else self.when.__doc__.strip().splitlines()[0]

    def runs(self, ctx: CompileContext) -> bool:
        return self.when is None or bool(self.when(ctx))


class Pipeline(tuple):
    """A tuple of PassSpec that finds an entry by its spec, its pass function or its name."""

    def __new__(cls, specs):
        specs = tuple(specs)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise TypeError(f"a pipeline names each pass once: {names}")
        return super().__new__(cls, specs)

    def index(self, p, *args) -> int:   # noqa: D401 - tuple.index, keyed by pass
        name = p if isinstance(p, str) else getattr(p, "name", None) or getattr(p, "__name__", None)
        for i, spec in enumerate(self):
            if spec.name == name:
                return i
        raise ValueError(f"no pass {name!r} in the pipeline; passes: {', '.join(s.name for s in self)}")

    def rows(self) -> list[dict]:
        """One row per pass: name, when it runs, what it requires, what it writes (``key?``: where found)."""
        return [{"pass": s.name, "runs when": s.when_text, "requires": ", ".join(s.requires) or "-",
                 "writes": ", ".join(s.writes + tuple(k + "?" for k in s.may_write)) or "-"} for s in self]


def as_spec(p) -> PassSpec:
    return p if isinstance(p, PassSpec) else PassSpec(p)


def checks_on() -> bool:
    return os.environ.get(CHECK_ENV, "") not in ("", "0")


def run_passes(gm: fx.GraphModule, ctx: CompileContext, passes, check: bool | None = None) -> fx.GraphModule:
    """Run each entry of ``passes`` (PassSpecs, or bare pass functions) whose ``when`` holds for ``ctx``.
    ``check``: hold each pass to its declarations (None: as ``FXQ_CHECK_PASSES`` says)."""
    check = checks_on() if check is None else check
    done: list[str] = []
    for spec in map(as_spec, passes):
        if not spec.runs(ctx):
            continue
        if check:
            _check_requires(gm, spec, done)
            before = _snapshot(gm)
        try:
            gm = spec.fn(gm, ctx)
            gm.graph.lint()
            gm.recompile()
        except FxqError as exc:
            exc.args = (f"[pass {spec.name}] {exc.args[0] if exc.args else ''}",) + exc.args[1:]
            raise
        except Exception as exc:  # noqa: BLE001 - an unexpected failure still names its pass
            raise PassError(f"pass '{spec.name}' (after {', '.join(done) or 'nothing'}) failed: "
                            f"{type(exc).__name__}: {exc}") from exc
        if check:
            _check_writes(gm, spec, done, before)
        done.append(spec.name)
    return gm


def _violation(spec: PassSpec, done: list[str], what: str) -> PassError:
    return PassError(f"pass '{spec.name}' (after {', '.join(done) or 'nothing'}) {what}")


def _carried(gm: fx.GraphModule, key: str) -> bool:
    return any(key in n.meta for n in gm.graph.nodes)


def _check_requires(gm: fx.GraphModule, spec: PassSpec, done: list[str]) -> None:
    for req in spec.requires:
        if req.startswith(_META_PREFIX):
            if not _carried(gm, req):
                raise _violation(spec, done, f"requires meta[{req!r}], and no node carries it")
        elif req not in done:
            raise _violation(spec, done, f"requires pass '{req}' to have run before it, and it has not")


def _snapshot(gm: fx.GraphModule):
    """The graph's structure, and every fxq meta value by identity (the values are kept so ids stay theirs)."""
    held: dict[str, dict[int, object]] = {}
    for n in gm.graph.nodes:
        for k, v in n.meta.items():
            if k.startswith(_META_PREFIX):
                held.setdefault(k, {})[id(v)] = v
    return _structure(gm), held


def _structure(gm: fx.GraphModule) -> list:
    return [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes]


def _check_writes(gm: fx.GraphModule, spec: PassSpec, done: list[str], before) -> None:
    structure, held = before
    written = {k for n in gm.graph.nodes for k, v in n.meta.items()
               if k.startswith(_META_PREFIX) and id(v) not in held.get(k, {})}
    undeclared = sorted(written - set(spec.writes) - set(spec.may_write))
    if undeclared:
        raise _violation(spec, done, f"wrote meta[{undeclared[0]!r}], which it does not declare "
                                     f"(writes {list(spec.writes)}, may_write {list(spec.may_write)})")
    if not written and _structure(gm) == structure:
        return                                      # changed nothing: nothing it declares had to appear
    for key in spec.writes:
        if not _carried(gm, key):
            raise _violation(spec, done, f"declares it writes meta[{key!r}], and no node carries it after it ran")
