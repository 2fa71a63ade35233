"""qm.report(): one row per quantization point: formats, shifts, bits and SQNR against float."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from .fakequant import set_quantization
from .ir import Graph, Node, Op

_ROW_OPS = (Op.QUANTIZE, Op.REQUANT, Op.ADD_INT, Op.AVGPOOL_INT)


@dataclass
class Report:
    rows: list[dict]
    summary: dict
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "summary": self.summary, "notes": self.notes}

    def __str__(self) -> str:
        out = [format_table(self.rows, ["layer", "op", "weights", "activation", "shift", "SQNR dB"], right={"SQNR dB"}), ""]
        out += [f"{k}: {v}" for k, v in self.summary.items()]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    __repr__ = __str__


def format_table(rows: list[dict], cols: list[str], right: set = frozenset()) -> str:
    """A plain-text table for a terminal: header, rule, one line per row; ``right`` columns right-aligned."""
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]

    def line(vals):
        return "  ".join(v.rjust(w) if c in right else v.ljust(w) for c, v, w in zip(cols, vals, widths)).rstrip()
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(row) for row in cells])


def _sqnr_db(ref: np.ndarray, q: np.ndarray) -> float:
    noise = float(((ref - q) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0.0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _capture(gm: fx.GraphModule, x: torch.Tensor, quantized: bool) -> dict[str, np.ndarray]:
    values: dict[str, np.ndarray] = {}

    class _Grab(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name.startswith("fq_") or n.op == "output":
                values[n.name] = out.detach().double().numpy()
            return out

    set_quantization(gm, quantized)
    try:
        with torch.no_grad():
            _Grab(gm).run(x.double())
    finally:
        set_quantization(gm, True)
    return values


def _weights_text(g: Graph, n: Node) -> str:
    if n.op is not Op.REQUANT:
        return "-"
    acc = g.node(n.inputs[0])
    f = acc.attrs.get("w_frac")
    if f is None:
        return "-"
    return f"i{acc.attrs['w_bits']} f={min(f)}" + (f"..{max(f)}" if min(f) != max(f) else "")


def _shift_text(n: Node) -> str:
    s = np.atleast_1d(np.asarray(n.attrs.get("shift", 0)))
    return f">>{s.min()}" + (f"..{s.max()}" if s.min() != s.max() else "")


def _producer(g: Graph, n: Node) -> str:
    if n.op is Op.REQUANT:
        return g.node(n.inputs[0]).op.value
    return n.op.value


def build_report(qm, x: torch.Tensor | None) -> Report:
    g: Graph = qm.ir
    sqnr: dict[str, float] = {}
    if qm.fake is not None and x is not None:
        import copy
        gm64 = copy.deepcopy(qm.fake).double()
        fq, fl = _capture(gm64, x, True), _capture(gm64, x, False)
        sqnr = {k: _sqnr_db(fl[k], fq[k]) for k in fq}
    rows = []
    for n in g.nodes:
        if n.op not in _ROW_OPS:
            continue
        src = n.attrs.get("src")
        rows.append({"layer": n.name, "op": _producer(g, n), "weights": _weights_text(g, n),
                     "activation": f"{n.out.dtype} f={n.out.frac} [{n.out.lo},{n.out.hi}]",
                     "shift": _shift_text(n) if "shift" in n.attrs else "-",
                     "SQNR dB": f"{sqnr[src]:.1f}" if src in sqnr else "-"})
    weighted = [n for n in g.nodes if n.op in (Op.CONV2D_INT, Op.LINEAR_INT)]
    macs = sum(int(np.prod(n.consts["w"].shape)) * int(np.prod([d for d in n.out.shape[2:]] or [1])) for n in weighted)
    rescales = sum(n.op in (Op.REQUANT, Op.ADD_INT, Op.AVGPOOL_INT) for n in g.nodes)
    summary = {
        "target": g.target.get("name") if g.target else "?",
        "layers with weights": len(weighted),
        "weight bits": sorted({n.attrs["w_bits"] for n in weighted}),
        "MACs per sample": macs,
        "rescales (all shifts, no multipliers)": rescales,
        "float islands": 0,
        "output SQNR dB": f"{sqnr['output']:.1f}" if "output" in sqnr else "- (pass x to measure)",
    }
    return Report(rows, summary, list(qm.notes))
