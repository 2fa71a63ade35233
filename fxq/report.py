"""qm.report(): one row per quantization point: formats, shifts, bits and SQNR against float.

With ``sensitivity=True`` two more columns say where the output error comes from: the network output's
SQNR when only this row's activation codes are quantized ("act alone dB"), and when only the weights of
the layer feeding it are ("w alone dB"), everything else in float. The local "SQNR dB" column cannot
tell this: a tensor with a good SQNR of its own can still dominate the output error when the layers after
it amplify its rounding (EfficientNet-Lite1's stem output feeding a depthwise conv with |w| up to 14).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from .errors import MissingExtra
from .context import model_input
from .fakequant import FakeQuant, _QWeighted, set_quantization
from .ir import CLUSTER_OPS, REQUANTIZING, WEIGHTED_OPS, Graph, Node, Op

SENSITIVITY_COLS = ("act alone dB", "w alone dB")
_ROW_OPS = (Op.QUANTIZE, Op.REQUANT, Op.ADD_INT, Op.AVGPOOL_INT, Op.FLOAT_ISLAND, Op.CONST)


@dataclass
class Report:
    rows: list[dict]
    summary: dict
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "summary": self.summary, "notes": self.notes}

    def __str__(self) -> str:
        cols = ["layer", "op", "weights", "activation", "shift", "mult->acc", "float", "SQNR dB"]
        cols += [c for c in SENSITIVITY_COLS if self.rows and c in self.rows[0]]
        out = [format_table(self.rows, cols, right={"SQNR dB", "mult->acc", *SENSITIVITY_COLS}), ""]
        out += [f"{k}: {v}" for k, v in self.summary.items()]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    __repr__ = __str__

    def plot(self, path) -> None:
        """A per-layer SQNR bar chart (needs matplotlib: ``pip install 'fxq[plot]'``)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise MissingExtra("the SQNR chart needs matplotlib: pip install 'fxq[plot]'") from None
        rows = [r for r in self.rows if r["SQNR dB"] not in ("-", "inf")]
        if not rows:
            raise ValueError("no SQNR measured: build the report with sample inputs, qm.report(x)")
        fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows)), 4.0))
        ax.bar(range(len(rows)), [float(r["SQNR dB"]) for r in rows], color="#4878a8")
        ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=75, fontsize=7)
        ax.set_ylabel("SQNR vs float (dB)")
        ax.set_title(f"fxq per-layer SQNR, target {self.summary.get('target')}")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


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
            _Grab(gm).run(model_input(x, torch.float64))
    finally:
        set_quantization(gm, True)
    return values


def _alone_sqnr(gm: fx.GraphModule, x: torch.Tensor, progress: bool) -> dict[str, float]:
    """Output SQNR with one quantizer on and the rest of ``gm`` in float, per FakeQuant / weighted node."""
    from tqdm.auto import tqdm
    modules = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(modules.get(n.target), (FakeQuant, _QWeighted))]
    x64 = model_input(x, torch.float64)
    out: dict[str, float] = {}
    set_quantization(gm, False)
    try:
        with torch.no_grad():
            ref = gm(x64).numpy()
            for n in tqdm(nodes, desc="fxq report: one quantizer at a time", unit="quantizer", disable=not progress,
                          leave=False):
                modules[n.target].enabled = True
                out[n.name] = _sqnr_db(ref, gm(x64).numpy())
                modules[n.target].enabled = False
    finally:
        set_quantization(gm, True)
    return out


def _db(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _frac_range(f) -> str:
    return f"{min(f)}" + (f"..{max(f)}" if min(f) != max(f) else "")


def _weights_text(g: Graph, n: Node) -> str:
    if n.op is not Op.REQUANT:
        return "-"
    acc = g.node(n.inputs[0])
    a = acc.attrs
    if acc.op in CLUSTER_OPS:
        codes = "tern" if a.w_bits == 2 else f"i{a.w_bits}"
        return f"{codes} N={a.cluster_size} x u{a.alpha_bits} f={_frac_range(a.w_frac)}"
    if acc.op not in WEIGHTED_OPS:
        return "-"
    if a.w_mant is not None:
        return f"i{a.w_bits} s={_frac_range(a.w_mant)}*2^-{_frac_range(a.w_frac)}"
    return f"i{a.w_bits} f={_frac_range(a.w_frac)}"


def multiplications(n: Node) -> tuple[int, int]:
    """(multiply-accumulates, multiplies left) per sample of a weighted node.

    Inside a cluster, ternary codes make each product an add or a subtract and 4-bit codes at most two
    shifted adds (every code in [-7, 7] is a sum of two signed powers of two); what remains is one
    multiply by the cluster's scale per cluster, per output: 1 - 1/(N*k*k) of the products are replaced.
    """
    w = n.consts["t" if n.op in CLUSTER_OPS else "w"]
    outputs = int(np.prod([d for d in n.out.shape[1:]]))          # output channels x positions
    per_output = int(np.prod(w.shape[1:]))                         # input channels per group x kernel
    if n.op not in CLUSTER_OPS:
        return outputs * per_output, outputs * per_output
    return outputs * per_output, outputs * n.consts["alpha"].shape[1]


def _range_text(v) -> str:
    v = np.atleast_1d(np.asarray(v))
    return f"{v.min()}" + (f"..{v.max()}" if v.min() != v.max() else "")


def _shift_text(n: Node) -> str:
    a = n.attrs
    mult = getattr(a, "multiplier", None)
    mult = getattr(a, "multipliers", None) if mult is None else mult
    return ("" if mult is None else f"x{_range_text(mult)} ") + f">>{_range_text(a.shift)}"


def _activation_text(n: Node) -> str:
    t = n.out
    scale = f"f={t.frac}" if not t.dyadic else f"s={t.mant}*2^-{t.frac}" + (f" zp={t.zp}" if t.zp else "")
    return f"{t.dtype} {scale} [{t.lo},{t.hi}]"


def _producer(g: Graph, n: Node) -> str:
    if n.op is Op.REQUANT:
        return g.node(n.inputs[0]).op.value
    if n.op is Op.FLOAT_ISLAND:
        return n.attrs.fn
    return n.op.value


def matmul_macs(g: Graph, n: Node) -> int:
    """Multiply-accumulates per sample of a product of two activations."""
    k = g.types()[n.inputs[0]].shape[-1]
    return int(np.prod([d for d in n.out.shape[1:]])) * int(k)


def build_report(qm, x: torch.Tensor | None, sensitivity: bool = False, progress: bool = True) -> Report:
    g: Graph = qm.ir
    sqnr: dict[str, float] = {}
    alone: dict[str, float] | None = None
    if sensitivity and (qm.fake is None or x is None):
        raise ValueError("report(sensitivity=True) runs the model: it needs x (inputs to measure on) and the "
                         "fake-quant model, which a QuantizedModel loaded from a file does not have")
    if qm.fake is not None and x is not None:
        import copy
        gm64 = copy.deepcopy(qm.fake).double()
        fq, fl = _capture(gm64, x, True), _capture(gm64, x, False)
        sqnr = {k: _sqnr_db(fl[k], fq[k]) for k in fq}
        if sensitivity:
            alone = _alone_sqnr(gm64, x, progress)
    rows = []
    for n in g.nodes:
        if n.op not in _ROW_OPS:
            continue
        src = n.src
        acc = g.node(n.inputs[0]) if n.op is Op.REQUANT else None
        replaced = "-"
        if acc is not None and acc.op in CLUSTER_OPS:
            macs, left = multiplications(acc)
            replaced = f"{100.0 * (macs - left) / macs:.1f}%"
        rows.append({"layer": n.name, "op": _producer(g, n), "weights": _weights_text(g, n),
                     "activation": _activation_text(n),
                     "shift": _shift_text(n) if n.op in REQUANTIZING else "-", "mult->acc": replaced,
                     "float": "f64" if n.op is Op.FLOAT_ISLAND else "-", "SQNR dB": _db(sqnr.get(src))})
        if alone is not None:
            layer = acc.name if acc is not None and acc.op in WEIGHTED_OPS else None
            rows[-1]["act alone dB"] = _db(alone.get(src))
            rows[-1]["w alone dB"] = _db(alone.get(layer))
    weighted = [n for n in g.nodes if n.op in WEIGHTED_OPS]
    counts = [multiplications(n) for n in weighted]
    macs, left = sum(c[0] for c in counts), sum(c[1] for c in counts)
    products = [n for n in g.nodes if n.op is Op.MATMUL_INT]
    act_macs = sum(matmul_macs(g, n) for n in products)
    islands = [n for n in g.nodes if n.op is Op.FLOAT_ISLAND]
    rescaling = [n for n in g.nodes if n.op in REQUANTIZING]
    multiplied = sum(getattr(n.attrs, "multiplier", None) is not None or getattr(n.attrs, "multipliers", None) is not None
                     for n in rescaling)
    summary = {
        "target": g.target.get("name") if g.target else "?",
        "layers with weights": len(weighted),
        "weight bits": sorted({n.attrs.w_bits for n in weighted}),
        "MACs per sample": macs,
        "multiplications replaced by accumulations": f"{macs - left} of {macs} ({100.0 * (macs - left) / max(macs, 1):.1f}%)",
        "rescales": f"{len(rescaling)}: {len(rescaling) - multiplied} shift only, {multiplied} integer multiply + shift",
        "activation x activation MACs per sample": act_macs if products else "-",
        "float islands": (f"{len(islands)} (" + ", ".join(f"{sum(i.attrs.fn == f for i in islands)} {f}"
                                                   for f in sorted({i.attrs.fn for i in islands})) + ")"
                          if islands else 0),
        "output SQNR dB": f"{sqnr['output']:.1f}" if "output" in sqnr else "- (pass x to measure)",
    }
    return Report(rows, summary, list(qm.notes))
