"""The integer IR: a short, topologically ordered list of exact integer ops.

Every tensor has an integer dtype, a shape (batch dim ``None``), a code range [lo, hi] and a
fractional length ``frac`` (value = code * 2**-frac; per channel for int32 accumulators). Scales are
therefore exact powers of two by construction, and every rescale is a shift. The one exception is the
``int8`` target: its tensors also carry an integer mantissa and a zero point (value = (code - zp) *
mant * 2**-frac), and its rescales multiply by an integer before they shift. ``verify()`` checks the
invariants the backends rely on and names the node that breaks one.
"""
from __future__ import annotations

import enum
import io
import json
import operator
import zipfile
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from .clusters import expand
from .errors import LoadError
from .formats import ACC_BITS, FP32_EXACT_BITS, FRAC_LIMITS, step_of

FORMAT_VERSION = 1


class Op(str, enum.Enum):
    QUANTIZE = "quantize"          # float input -> codes: round(x * 2**frac), saturate
    DEQUANTIZE = "dequantize"      # codes -> float output
    CONV2D_INT = "conv2d_int"      # int32 accumulate of codes x weight codes, + int32 bias
    LINEAR_INT = "linear_int"      # likewise for a matrix product
    CONV2D_CLUSTER = "conv2d_cluster"  # per cluster of N input channels: sum of code x input (adds for
    LINEAR_CLUSTER = "linear_cluster"  # ternary codes), times the cluster's scale code; int32 accumulate
    REQUANT = "requant"            # int32 -> narrow codes: (multiply,) shift (per channel), round, clamp
    ADD_INT = "add_int"            # align by left shifts (or multipliers), add in int32, then requant
    AVGPOOL_INT = "avgpool_int"    # window sum, divide by 2**k as a shift, requant
    MAXPOOL_INT = "maxpool_int"    # max of codes (same format in and out)
    CONCAT_INT = "concat_int"      # codes of one format, joined along an axis
    PAD_INT = "pad_int"            # zero codes around the spatial dims
    CLAMP_INT = "clamp_int"        # codes clamped (standalone ReLU / ReLU6)
    RESHAPE = "reshape"            # codes unchanged, new shape
    PERMUTE = "permute"            # codes unchanged, axes reordered (the batch axis stays first)
    SELECT = "select"              # one index along a non-batch axis (x[:, i])
    EXPAND_BATCH = "expand_batch"  # a batch-1 constant repeated to the batch of the second input
    CONST = "const"                # constant codes with a leading batch dim of 1 (class token, position embedding)
    MATMUL_INT = "matmul_int"      # int32 accumulate of codes x codes (two activations, batched over leading axes)
    FLOAT_ISLAND = "float_island"  # declared by the target: codes -> float64 -> softmax/GELU/LayerNorm -> codes
    SOFTMAX_INT = "softmax_int"    # integer-only softmax over the last axis (fxq.int_nonlinear)
    GELU_INT = "gelu_int"          # integer-only GELU
    LAYERNORM_INT = "layernorm_int"  # integer-only LayerNorm over the last axis (integer sqrt)
    GATHER = "gather"              # rows of a constant code table picked by the integer input (token embedding)
    TOKEN_MASK = "token_mask"      # 1 where the integer input compares true with a constant (ids != pad), else 0
    MASKED_MEAN_INT = "masked_mean_int"  # integer mean over the valid tokens (axis 1), a rounded division
    L2NORM_INT = "l2norm_int"      # integer x / ||x|| over the last axis (integer sqrt, rounded division)
    TWIN_QUANT = "twin_quant"      # fine codes -> b-bit twin-uniform codes (range bit + magnitude)
    TWIN_EXPAND = "twin_expand"    # twin codes -> fine codes at the small step (R2 magnitudes << m)


# fxq.int_nonlinear's kernels by function name, and back.
INT_NONLINEAR_OPS = {"softmax": Op.SOFTMAX_INT, "gelu": Op.GELU_INT, "layer_norm": Op.LAYERNORM_INT,
                     "masked_mean": Op.MASKED_MEAN_INT, "l2_normalize": Op.L2NORM_INT}
INT_NONLINEAR_FN = {op: fn for fn, op in INT_NONLINEAR_OPS.items()}
# token_mask comparisons: the graph function and its name in the IR.
TOKEN_COMPARISONS = {operator.ne: "ne", operator.eq: "eq", operator.gt: "gt", operator.ge: "ge",
                     operator.lt: "lt", operator.le: "le"}
# Ops that accumulate products of codes and constant weights into an int32 accumulator.
WEIGHTED_OPS = frozenset({Op.CONV2D_INT, Op.LINEAR_INT, Op.CONV2D_CLUSTER, Op.LINEAR_CLUSTER})
CONV_OPS = frozenset({Op.CONV2D_INT, Op.CONV2D_CLUSTER})
CLUSTER_OPS = frozenset({Op.CONV2D_CLUSTER, Op.LINEAR_CLUSTER})
# Ops that rescale (their ``shift`` attribute must equal frac_in - frac_out) and round.
REQUANTIZING = frozenset({Op.REQUANT, Op.ADD_INT, Op.AVGPOOL_INT})
# Ops whose output carries the input's codes and format unchanged (up to selection/clamping).
SAME_FORMAT = frozenset({Op.MAXPOOL_INT, Op.CONCAT_INT, Op.PAD_INT, Op.CLAMP_INT, Op.RESHAPE, Op.PERMUTE, Op.SELECT,
                         Op.EXPAND_BATCH})
SHORT_DTYPE = {"int8": "i8", "uint8": "u8", "int16": "i16", "uint16": "u16", "int32": "i32", "float32": "f32"}


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
            return f"{text} f={_frac_text(self.frac)}"
        zp = f" zp={self.zp}" if self.zp else ""
        return f"{text} s={_frac_text(self.mant)}*2^-{_frac_text(self.frac)}{zp}"

    def to_json(self) -> dict:
        d = {"dtype": self.dtype, "shape": list(self.shape), "frac": _jsonable(self.frac), "lo": self.lo, "hi": self.hi,
             "mant": _jsonable(self.mant), "zp": self.zp}
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
    name: str
    op: Op
    inputs: list[str]
    out: TensorType
    attrs: dict = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)


def weight_codes(n: Node) -> np.ndarray:
    """The integer weights a weighted node multiplies by (int64): for a cluster op, code * scale code.

    Integer sums are associative, so accumulating per cluster and then multiplying by the cluster's
    scale gives exactly the sum with these effective weights; backends may use either form.
    """
    if n.op in CLUSTER_OPS:
        t = n.consts["t"].astype(np.int64)
        return t * expand(n.consts["alpha"].astype(np.int64), t.shape, int(n.attrs["cluster_size"]))
    return n.consts["w"].astype(np.int64)


def int_nonlinear_constants(n: Node, x: TensorType):
    """fxq.int_nonlinear's constants of an integer softmax/GELU/LayerNorm node with input type ``x``."""
    from . import int_nonlinear as inl
    if n.op is Op.SOFTMAX_INT:
        return inl.softmax_constants(int(x.frac), int(n.out.frac))
    if n.op is Op.GELU_INT:
        return inl.gelu_constants(int(x.frac), int(n.out.frac))
    if n.op is Op.MASKED_MEAN_INT:
        return inl.masked_mean_constants(int(x.frac), int(n.out.frac))
    if n.op is Op.L2NORM_INT:
        return inl.l2_normalize_constants(int(x.frac), int(n.out.frac), int(x.shape[-1]))
    a = n.attrs
    return inl.LayerNormConstants(int(a["n"]), int(a["var_shift"]), int(a["eps"]), int(a["norm_shift"]),
                                  int(a["norm_max"]), int(a["gamma_frac"]), n.consts["gamma"].astype(np.int64),
                                  n.consts["beta"].astype(np.int64), int(a["out_shift"]))


def _frac_text(frac) -> str:
    if isinstance(frac, tuple):
        lo, hi = min(frac), max(frac)
        return str(lo) if lo == hi else f"{lo}..{hi}"
    return str(frac)


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    return v


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
        a = n.attrs
        ins = [f"%{i}" if i != self.input_name else f"{i}:{self.input_type.short()}" for i in n.inputs]
        if n.op in WEIGHTED_OPS:
            if n.op in CLUSTER_OPS:
                t, alpha = n.consts["t"], n.consts["alpha"]
                codes = "tern" if a["w_bits"] == 2 else f"i{a['w_bits']}"
                ins.append(f"t:{codes}[{','.join(map(str, t.shape))}]")
                ins.append(f"sum/{a['cluster_size']}ch x a:u{a['alpha_bits']}[{','.join(map(str, alpha.shape))}] "
                           f"f={_frac_text(tuple(a['w_frac']))}")
            else:
                w = n.consts["w"]
                step = f"f={_frac_text(tuple(a['w_frac']))}"
                if "w_mant" in a:
                    step = f"s={_frac_text(tuple(a['w_mant']))}*2^-{_frac_text(tuple(a['w_frac']))}"
                ins.append(f"w:i{a['w_bits']}[{','.join(map(str, w.shape))}] {step}")
            ins.append(f"b:i32 f={_frac_text(n.out.frac)}")
            if n.op in CONV_OPS:
                conv = [f"s={_pair_text(a['stride'])}", f"p={_pair_text(a['padding'])}"]
                conv += [f"d={_pair_text(a['dilation'])}"] if tuple(a["dilation"]) != (1, 1) else []
                conv += [f"g={a['groups']}"] if a["groups"] != 1 else []
                ins += conv
        elif n.op in REQUANTIZING:
            if n.op is Op.ADD_INT and "multipliers" in a:
                ins = [f"({t}{-z:+d}) x{m}" if z else f"{t} x{m}" for t, z, m in zip(ins, a["in_zp"], a["multipliers"])]
            elif n.op is Op.ADD_INT:
                ins = [f"{t} <<{s}" if s else t for t, s in zip(ins, a["align"])]
            if n.op is Op.AVGPOOL_INT:
                ins.append(f"k={_pair_text(a['kernel'])} sum/2^{a['divisor_log2']}")
            if "multiplier" in a:
                ins.append(f"x{_frac_text(_tuple(a['multiplier']))}")
            ins.append(f">>{_frac_text(_tuple(a['shift']))} {a['rounding']}")
            if n.out.zp:
                ins.append(f"+{n.out.zp}")
            ins.append(f"clamp[{n.out.lo},{n.out.hi}]")
        elif n.op is Op.MAXPOOL_INT:
            ins.append(f"k={_pair_text(a['kernel'])} s={_pair_text(a['stride'])} p={_pair_text(a['padding'])}")
        elif n.op is Op.CLAMP_INT:
            ins.append(f"[{a['lo']},{a['hi']}]")
        elif n.op is Op.CONCAT_INT:
            ins.append(f"axis={a['axis']}")
        elif n.op is Op.PAD_INT:
            ins.append(f"pads={list(a['pads'])}")
        elif n.op is Op.QUANTIZE:
            ins.append(a["rounding"])
        elif n.op is Op.PERMUTE:
            ins.append(f"perm={list(a['perm'])}")
        elif n.op is Op.SELECT:
            ins.append(f"axis={a['axis']} index={a['index']}")
        elif n.op is Op.MATMUL_INT:
            ins = [f"({t}{-a[k]:+d})" if a.get(k) else t for t, k in zip(ins, ("a_zp", "b_zp"))]
        elif n.op is Op.FLOAT_ISLAND:
            fn = a["fn"] + (f"[{a['approximate']}]" if a.get("approximate", "none") != "none" else "")
            ins += [f"{fn} in f64"] + ([f"key mask {a['on_valid']:g}|{a['on_invalid']:g}"] if "on_invalid" in a else [])
            ins += [a["rounding"], f"clamp[{n.out.lo},{n.out.hi}]"]
        elif n.op is Op.CONST:
            ins.append(f"codes[{','.join(map(str, n.consts['codes'].shape))}]")
        elif n.op is Op.GATHER:
            ins.append(f"table:{SHORT_DTYPE.get(str(n.consts['table'].dtype), n.consts['table'].dtype)}"
                       f"[{','.join(map(str, n.consts['table'].shape))}]")
        elif n.op is Op.TOKEN_MASK:
            ins.append(f"{a['compare']} {a['value']}")
        elif n.op is Op.TWIN_QUANT:
            bits, m, signed = n.out.twin
            ins.append(f"{'neg' if signed else f'<{2 ** (bits - 1)}'} -> R1, else R2 >>{m} {a['rounding']}")
        elif n.op is Op.TWIN_EXPAND:
            ins.append(f"R2 <<{types[n.inputs[0]].twin[1]}")
        elif n.op is Op.SOFTMAX_INT:
            ins += ["exp2 poly5, /sum"] + (["+mask"] if "mask" in n.consts else [])
            ins += [f"key mask {a['key_mask'][0]}|{a['key_mask'][1]}"] if "key_mask" in a else []
        elif n.op is Op.MASKED_MEAN_INT:
            ins.append("sum/count")
        elif n.op is Op.L2NORM_INT:
            ins.append("isqrt, /norm")
        elif n.op is Op.GELU_INT:
            ins.append("relu - poly8")
        elif n.op is Op.LAYERNORM_INT:
            ins.append(f"isqrt, g:i16[{a['n']}] f={a['gamma_frac']}, >>{a['out_shift']}")
        return ins

    # -- verification ---------------------------------------------------------------------------
    def verify(self) -> "Graph":
        from .verify import verify
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
                           "attrs": _jsonable_attrs(n.attrs), "consts": sorted(n.consts)} for n in self.nodes]}

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
                nodes.append(Node(d["name"], Op(d["op"]), list(d["inputs"]), TensorType.from_json(d["out"]),
                                  _attrs_from_json(d["attrs"]), c))
            g = cls(doc["input"], TensorType.from_json(doc["input_type"]), nodes, doc["output"], doc.get("target"))
        except (KeyError, TypeError, ValueError) as exc:
            raise LoadError(f"{path}: malformed fxq IR ({type(exc).__name__}: {exc})") from exc
        return g.verify()


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _pair_text(v) -> str:
    v = tuple(v)
    return str(v[0]) if len(set(v)) == 1 else "x".join(map(str, v))


def _jsonable_attrs(attrs: dict) -> dict:
    return {k: _jsonable(tuple(v) if isinstance(v, list) else v) for k, v in attrs.items()}


def _attrs_from_json(attrs: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in attrs.items()}


__all__ = ["INT_NONLINEAR_OPS", "Op", "TensorType", "Node", "Graph", "ACC_BITS", "FRAC_LIMITS"]
