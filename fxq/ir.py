"""The integer IR: a short, topologically ordered list of exact integer ops.

Every tensor has an integer dtype, a shape (batch dim ``None``), a code range [lo, hi] and a
fractional length ``frac`` (value = code * 2**-frac; per channel for int32 accumulators). Scales are
therefore exact powers of two by construction, and every rescale is a shift. The one exception is the
``int8`` target: its tensors also carry an integer mantissa and a zero point (value = (code - zp) *
mant * 2**-frac), and its rescales multiply by an integer before they shift. ``verify()`` checks the
invariants the backends rely on and names the node that breaks one.
"""
from __future__ import annotations

import io
import json
import operator
import zipfile
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from .errors import LoadError, VerifyError
from .formats import ACC_BITS, FP32_EXACT_BITS, FRAC_LIMITS, step_of
from .ops import OPS, AttrError, Attrs, Op, ops_where, spec, weight_codes
from .ops.base import jsonable
from .ops.text import SHORT_DTYPE, frac_text
from .verify import verify

FORMAT_VERSION = 1

# fxq.int_nonlinear's kernels by function name (what lower emits for an IntNonlinear module).
INT_NONLINEAR_OPS = {s.fn: op for op, s in OPS.items() if getattr(s, "fn", "")}
# token_mask comparisons: the graph function and its name in the IR.
TOKEN_COMPARISONS = {operator.ne: "ne", operator.eq: "eq", operator.gt: "gt", operator.ge: "ge",
                     operator.lt: "lt", operator.le: "le"}
# Op families, from the op table's kind properties.
WEIGHTED_OPS = ops_where("weighted")
CONV_OPS = ops_where("conv")
CLUSTER_OPS = ops_where("cluster")
REQUANTIZING = ops_where("requantizing")
SAME_FORMAT = ops_where("same_format")


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple                      # batch dim is None
    frac: int | tuple | None = None   # None for float tensors; a tuple is per channel (axis 1)
    lo: int | None = None             # code range the producer guarantees
    hi: int | None = None
    mant: int | tuple = 1             # int8 target: integer mantissa of the step (a tuple is per channel)
    zp: int = 0                       # int8 target: the code of the value 0
    twin: tuple | None = None         # twin-uniform codes: (bits, m, signed) of fxq.formats.Twin; frac is R1's

    @property
    def frac_array(self) -> np.ndarray:
        return np.asarray(self.frac, dtype=np.int64)

    @property
    def mant_array(self) -> np.ndarray:
        return np.asarray(self.mant, dtype=np.int64)

    @property
    def step(self) -> np.ndarray:
        """mant * 2**-frac, per channel for accumulators (float64, exact)."""
        return step_of(self.frac_array, self.mant_array)

    @property
    def dyadic(self) -> bool:
        return bool(np.any(self.mant_array != 1)) or self.zp != 0

    @property
    def max_abs(self) -> int:
        """Largest |code - zp|: the magnitude a product or a sum sees."""
        return max(abs(self.lo - self.zp), abs(self.hi - self.zp))

    def short(self) -> str:
        dims = ",".join("N" if d is None else str(d) for d in self.shape)
        text = f"{SHORT_DTYPE.get(self.dtype, self.dtype)}[{dims}]"
        if self.frac is None:
            return text
        if self.twin is not None:
            bits, m, signed = self.twin
            return f"twin{bits}[{dims}] f={self.frac}|{self.frac - m}"
        if not self.dyadic:
            return f"{text} f={frac_text(self.frac)}"
        zp = f" zp={self.zp}" if self.zp else ""
        return f"{text} s={frac_text(self.mant)}*2^-{frac_text(self.frac)}{zp}"

    def to_json(self) -> dict:
        d = {"dtype": self.dtype, "shape": list(self.shape), "frac": jsonable(self.frac), "lo": self.lo, "hi": self.hi,
             "mant": jsonable(self.mant), "zp": self.zp}
        if self.twin is not None:
            d["twin"] = list(self.twin)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TensorType":
        tup = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
        twin = d.get("twin")
        return cls(d["dtype"], tuple(d["shape"]), tup(d["frac"]), d["lo"], d["hi"], tup(d.get("mant", 1)), d.get("zp", 0),
                   None if twin is None else (int(twin[0]), int(twin[1]), bool(twin[2])))


@dataclass
class Node:
    """One IR op. ``attrs`` is the op's frozen Attrs (a dict given here is converted, and an unknown or
    missing attribute is a VerifyError naming the node); ``src`` names the fake-quant point whose float
    value report() compares this node's output with."""
    name: str
    op: Op
    inputs: list[str]
    out: TensorType
    attrs: Attrs | dict = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    src: str | None = None

    def __post_init__(self):
        try:
            self.op = Op(self.op)
        except ValueError:
            raise VerifyError(f"IR node '%{self.name}': unknown op {self.op!r}; known: {[o.value for o in OPS]}") from None
        kind = spec(self.op).Attrs
        if isinstance(self.attrs, dict):
            try:
                self.attrs = kind.from_dict(self.attrs, self.op.value)
            except (AttrError, TypeError) as exc:
                raise VerifyError(f"IR node '%{self.name}' ({self.op.value}): {exc}") from None
        elif type(self.attrs) is not kind:
            raise VerifyError(f"IR node '%{self.name}' ({self.op.value}): attributes {type(self.attrs).__name__} "
                              f"are not {kind.__name__}")

    @property
    def spec(self):
        return OPS[self.op]


class Graph:
    """Integer graph: one float input, one float output, nodes in execution order."""

    def __init__(self, input_name: str, input_type: TensorType, nodes: list[Node], output: str,
                 target: dict | None = None):
        self.input_name = input_name
        self.input_type = input_type
        self.nodes = nodes
        self.output = output
        self.target = target or {}

    # -- access ---------------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no IR node named {name!r}")

    def output_codes(self) -> Node:
        """The node whose codes the graph dequantizes into its float output (verify: the output is a
        float32 dequantize of codes)."""
        return self.node(self.node(self.output).inputs[0])

    def types(self) -> dict[str, TensorType]:
        t = {self.input_name: self.input_type}
        t.update({n.name: n.out for n in self.nodes})
        return t

    def to_networkx(self) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_node(self.input_name, op="input")
        for n in self.nodes:
            g.add_node(n.name, op=n.op.value)
            g.add_edges_from((i, n.name) for i in n.inputs)
        return g

    # -- printing -------------------------------------------------------------------------------
    def __str__(self) -> str:
        types = self.types()
        rows = [(f"%{n.name}", f"{n.op.value}({', '.join(self._arg_text(n, types))})", f"-> {n.out.short()}")
                for n in self.nodes]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        head = f"# fxq integer graph: input {self.input_name}:{self.input_type.short()}, {len(self.nodes)} nodes"
        if self.target:
            head += f", target {self.target.get('name')}"
        return "\n".join([head] + [f"{a:<{w0}} = {b:<{w1}} {c}" for a, b, c in rows])

    __repr__ = __str__

    def _arg_text(self, n: Node, types: dict[str, TensorType]) -> list[str]:
        ins = [f"%{i}" if i != self.input_name else f"{i}:{self.input_type.short()}" for i in n.inputs]
        return n.spec.text(n, ins, types)

    # -- verification ---------------------------------------------------------------------------
    def verify(self) -> "Graph":
        verify(self)
        return self

    def fp32_inexact(self) -> list[str]:
        """Nodes whose accumulators may exceed 2**24: float32 executors could round there."""
        lim = 2 ** FP32_EXACT_BITS
        return [n.name for n in self.nodes if n.out.dtype == "int32" and n.out.max_abs > lim]

    # -- persistence: JSON for structure, .npz for constants, in one zip; never pickle ----------
    def to_json(self) -> dict:
        return {"format": "fxq-ir", "version": FORMAT_VERSION, "input": self.input_name,
                "input_type": self.input_type.to_json(), "output": self.output, "target": self.target,
                "nodes": [{"name": n.name, "op": n.op.value, "inputs": n.inputs, "out": n.out.to_json(),
                           "attrs": n.attrs.to_json(), "consts": sorted(n.consts), **({"src": n.src} if n.src else {})}
                          for n in self.nodes]}

    def save(self, path) -> None:
        arrays = {f"{n.name}/{k}": v for n in self.nodes for k, v in n.consts.items()}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("ir.json", json.dumps(self.to_json(), indent=1))
            z.writestr("consts.npz", buf.getvalue())

    @classmethod
    def load(cls, path) -> "Graph":
        try:
            with zipfile.ZipFile(path) as z:
                doc = json.loads(z.read("ir.json"))
                consts = np.load(io.BytesIO(z.read("consts.npz")), allow_pickle=False)
                arrays = {k: consts[k] for k in consts.files}
        except FileNotFoundError:
            raise
        except (zipfile.BadZipFile, KeyError, EOFError, ValueError, OSError) as exc:
            raise LoadError(f"{path}: not a readable fxq model file ({type(exc).__name__}: {exc}); "
                            f"it may be truncated or corrupt") from exc
        if doc.get("format") != "fxq-ir":
            raise LoadError(f"{path}: not an fxq model file (format field {doc.get('format')!r})")
        if doc.get("version") != FORMAT_VERSION:
            raise LoadError(f"{path}: fxq IR version {doc.get('version')!r}; this fxq reads version {FORMAT_VERSION}")
        try:
            nodes = []
            for d in doc["nodes"]:
                c = {k: arrays[f"{d['name']}/{k}"] for k in d["consts"]}
                attrs = dict(d["attrs"])
                src = d.get("src", attrs.pop("src", None))      # files before the Node.src field kept it in attrs
                nodes.append(Node(d["name"], d["op"], list(d["inputs"]), TensorType.from_json(d["out"]), attrs, c, src))
            g = cls(doc["input"], TensorType.from_json(doc["input_type"]), nodes, doc["output"], doc.get("target"))
        except (KeyError, TypeError, ValueError) as exc:
            raise LoadError(f"{path}: malformed fxq IR ({type(exc).__name__}: {exc})") from exc
        return g.verify()


__all__ = ["INT_NONLINEAR_OPS", "Op", "TensorType", "Node", "Graph", "ACC_BITS", "FRAC_LIMITS", "weight_codes"]
