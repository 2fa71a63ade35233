"""fxq.int_nonlinear's integer softmax, GELU and LayerNorm as float64 ONNX nodes, bit exact with FLOAT64.

The algorithms are traced, not re-written: ``OnnxOps`` is a fourth ``IntOps`` spelling whose arrays are
ONNX tensor names, so running ``softmax_codes`` & co. on it appends one node per operation that
``Float64Ops`` performs, in the same order and with the same float64 arithmetic (``floor(a / b)``,
``floor(x * 2**-k)``). Every value is an integer below 2**52, so ONNX Runtime's float64 kernels compute
each node exactly and the graph's codes equal NUMPY's bit for bit. Every op used has a float64 CPU kernel
in ONNX Runtime (no Erf, Exp, Pow or Mod is needed: the algorithms only add, multiply, divide and floor).
"""
from __future__ import annotations

import math

import numpy as np

from fxq import int_nonlinear as inl

_SCALAR = (int, float, np.integer, np.floating)
LAST_AXIS = "inl_axes_last"       # the int64 axes input of ReduceMax/ReduceSum (opset 18+)


class Sym:
    """An ONNX tensor name standing in for an array: float64 integers, or bool for comparison results.

    Python operators append nodes through ``ops``; scalars on either side become float64 initializers.
    """
    __slots__ = ("ops", "name", "is_bool")
    __array_ufunc__ = None            # numpy scalars on the left defer to our reflected operators

    def __init__(self, ops: "OnnxOps", name: str, is_bool: bool = False):
        self.ops, self.name, self.is_bool = ops, name, is_bool

    def __repr__(self):
        return f"Sym({self.name!r}{', bool' if self.is_bool else ''})"

    def __bool__(self):
        raise TypeError("a traced ONNX tensor has no truth value: the algorithm branched on data")

    def __add__(self, o): return self.ops.arith("Add", self, o)
    def __radd__(self, o): return self.ops.arith("Add", o, self)
    def __sub__(self, o): return self.ops.arith("Sub", self, o)
    def __rsub__(self, o): return self.ops.arith("Sub", o, self)
    def __mul__(self, o): return self.ops.arith("Mul", self, o)
    def __rmul__(self, o): return self.ops.arith("Mul", o, self)
    def __neg__(self): return self.ops.unary("Neg", self)

    def __gt__(self, o): return self.ops.compare("Greater", self, o)
    def __lt__(self, o): return self.ops.compare("Less", self, o)
    def __ge__(self, o): return self.ops.compare("GreaterOrEqual", self, o)
    def __le__(self, o): return self.ops.compare("LessOrEqual", self, o)
    def __eq__(self, o): return self.ops.compare("Equal", self, o)
    def __ne__(self, o): return self.ops.logical_not(self.ops.compare("Equal", self, o))
    __hash__ = None

    def __and__(self, o): return self.ops.logical("And", self, o)
    def __rand__(self, o): return self.ops.logical("And", o, self)
    def __or__(self, o): return self.ops.logical("Or", self, o)
    def __ror__(self, o): return self.ops.logical("Or", o, self)
    def __invert__(self): return self.ops.logical_not(self)

    def __getitem__(self, key):
        """Only ``x[..., None]``, a trailing unit axis (Unsqueeze), as masked_mean broadcasts its mask."""
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] is Ellipsis and key[1] is None):
            raise TypeError(f"{self}: a traced ONNX tensor supports only x[..., None] indexing, got {key!r}")
        axes = self.ops.b.const(LAST_AXIS, np.array([-1], np.int64))
        return self.ops._node("Unsqueeze", [self.ops._num(self), axes])


class OnnxOps(inl.IntOps):
    """The ONNX spelling: each method appends the float64 nodes that compute what ``Float64Ops`` computes.

    ``builder`` needs ``node(op, inputs, output, **attrs)``, ``f64(name, value)`` and ``const(name, array)``
    (backends.onnx_qdq._Builder). Node names are ``{prefix}_{index}_{op}``, unique per prefix.
    """

    def __init__(self, builder, prefix: str):
        self.b, self.prefix, self.count = builder, prefix, 0

    # -- plumbing --------------------------------------------------------------------------------
    def _node(self, op: str, inputs: list[str], is_bool: bool = False, **attrs) -> Sym:
        name = self.b.node(op, inputs, f"{self.prefix}_{self.count}_{op.lower()}", **attrs)
        self.count += 1
        return Sym(self, name, is_bool)

    def scalar(self, v) -> str:
        """A float64 scalar initializer, named by its value so that equal constants are shared."""
        f = float(v)
        exact = int(f) == int(v) if isinstance(v, (int, np.integer)) else math.isfinite(f)
        if not exact:
            raise ValueError(f"constant {v!r} is not exact in float64")
        if f.is_integer():
            key = f"inl_{int(f)}".replace("-", "m")
        else:
            m, e = math.frexp(f)
            key = f"inl_{m!r}_2pow{e}".replace("-", "m").replace(".", "p")
        return self.b.f64(key, np.array(f, np.float64))

    def _num(self, v) -> str:
        if isinstance(v, Sym):
            if v.is_bool:
                raise TypeError(f"{v} is a comparison result, not a number")
            return v.name
        if isinstance(v, _SCALAR) and not isinstance(v, (bool, np.bool_)):
            return self.scalar(v)
        raise TypeError(f"OnnxOps cannot use {type(v).__name__} {v!r} as a float64 operand")

    def _bool(self, v) -> str:
        if isinstance(v, Sym) and v.is_bool:
            return v.name
        # Float64Ops raises here too (& on float64 arrays): a bit mask like x & (2**k - 1) would have to be
        # written x - floor(x * 2**-k) * 2**k in the algorithm, as _round_up already does for parity.
        raise TypeError(f"& | ~ need comparison results, got {v!r}; write x & (2**k - 1) as "
                        f"x - xp.shift_right_floor(x, k) * 2**k")

    # -- Python operators --------------------------------------------------------------------------
    def arith(self, op: str, a, b) -> Sym:
        return self._node(op, [self._num(a), self._num(b)])

    def unary(self, op: str, a) -> Sym:
        return self._node(op, [self._num(a)])

    def compare(self, op: str, a, b) -> Sym:
        return self._node(op, [self._num(a), self._num(b)], is_bool=True)

    def logical(self, op: str, a, b) -> Sym:
        return self._node(op, [self._bool(a), self._bool(b)], is_bool=True)

    def logical_not(self, a) -> Sym:
        return self._node("Not", [self._bool(a)], is_bool=True)

    # -- IntOps ----------------------------------------------------------------------------------
    def codes(self, q, fn):
        """The input: a Sym, or the name of a float64 tensor of integer-valued codes."""
        return q if isinstance(q, Sym) else Sym(self, q)

    def const(self, v, like):
        """Per-channel constants (gamma, beta) as float64 initializers; int64 codes below 2**53 are exact."""
        a = np.asarray(v)
        if a.ndim == 0:
            return Sym(self, self.scalar(a.item()))
        f = a.astype(np.float64)
        if not np.array_equal(f.astype(a.dtype), a):
            raise ValueError("constant array is not exact in float64")
        name = self.b.f64(f"{self.prefix}_const{self.count}", f)
        self.count += 1
        return Sym(self, name)

    def bounds(self, x):
        raise TypeError("a traced ONNX tensor has no bounds at export time: validate the codes' format instead")

    def where(self, c, a, b):
        return self._node("Where", [self._bool(c), self._num(a), self._num(b)])

    def clip(self, x, lo, hi):
        """Clip with float64 bounds; a None bound is an omitted optional input, like np.clip's."""
        ins = [self._num(x), "" if lo is None else self._num(lo)]
        if hi is not None:
            ins.append(self._num(hi))
        return self._node("Clip", ins)

    def abs(self, x):
        return self.unary("Abs", x)

    def _reduce(self, op, x, axis, keepdims):
        if axis == -1 and keepdims:
            axes = self.b.const(LAST_AXIS, np.array([-1], np.int64))
            return self._node(op, [self._num(x), axes], keepdims=1)
        # one other axis, with or without keepdims (masked_mean sums over the token axis 1)
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
            raise ValueError(f"{op}: axis must be one integer, got {axis!r}")
        axes = self.b.const(f"inl_axes_{int(axis)}".replace("-", "m"), np.array([int(axis)], np.int64))
        return self._node(op, [self._num(x), axes], keepdims=int(bool(keepdims)))

    def amax(self, x, axis=-1, keepdims=True):
        return self._reduce("ReduceMax", x, axis, keepdims)

    def sum(self, x, axis=-1, keepdims=True):
        return self._reduce("ReduceSum", x, axis, keepdims)   # exact in any order: every partial sum < 2**52

    def floor_div(self, a, b):
        """floor(a / b), as Float64Ops: exact since |a| < 2**53 and b > 0 is an integer."""
        return self.unary("Floor", self.arith("Div", a, b))

    def shift_right_floor(self, x, k: int):
        """floor(x * 2**-k), as Float64Ops; k = 0 is the identity on integers, so it emits nothing."""
        if k == 0:
            return x if isinstance(x, Sym) else Sym(self, self._num(x))
        return self.unary("Floor", self.arith("Mul", x, math.ldexp(1.0, -k)))


# ---------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------
ALGORITHMS = {
    "softmax": (inl.softmax_codes, inl.SoftmaxConstants),
    "gelu": (inl.gelu_codes, inl.GeluConstants),
    "layer_norm": (inl.layer_norm_codes, inl.LayerNormConstants),
    "masked_mean": (inl.masked_mean_codes, inl.MaskedMeanConstants),
    "l2_normalize": (inl.l2_normalize_codes, inl.L2NormalizeConstants),
}
# the float64 input tensors a function reads besides x, passed to emit as ``extra`` (name -> tensor name),
# in the order its *_codes function takes them after the codes
EXTRA_INPUTS = {"masked_mean": ("valid",)}


def emit(builder, fn: str, x: str, consts, out_lo: int, out_hi: int, prefix: str,
         extra: dict[str, str] | None = None) -> str:
    """Append ``fn`` ("softmax", "gelu" or "layer_norm") on the float64 codes tensor ``x`` (integer-valued,
    within int16, last axis as long as the constants say) and return the name of its float64 output codes,
    clamped to [out_lo, out_hi]. ``consts`` comes from the matching ``*_constants``, which checked the fracs.

    "masked_mean" (x [N, T, D] -> [N, D], T <= 4096) also reads ``extra={"valid": name}``, a float64 [N, T]
    tensor of 0/1 (see EXTRA_INPUTS); "l2_normalize" (last axis, D <= 4096) needs nothing more. Functions
    without extra inputs take ``extra=None`` (or {}), so existing calls are unchanged.
    """
    key = fn.removeprefix("int_")
    if key not in ALGORITHMS:
        raise ValueError(f"unknown integer nonlinearity {fn!r}; expected one of {sorted(ALGORITHMS)}")
    codes_fn, const_type = ALGORITHMS[key]
    if not isinstance(consts, const_type):
        raise TypeError(f"{fn}: constants must be {const_type.__name__}, got {type(consts).__name__}")
    lo, hi = inl._out_range(f"int_{key}", out_lo, out_hi)
    names, extra = EXTRA_INPUTS.get(key, ()), dict(extra or {})
    if set(extra) != set(names):
        raise ValueError(f"{fn}: extra inputs must be exactly {list(names)}, got {sorted(extra)}")
    xp = OnnxOps(builder, prefix)
    ins = [xp.codes(extra[n], fn) for n in names]
    return codes_fn(xp, xp.codes(x, fn), *ins, consts, lo, hi).name
