"""The IR verifier: the invariants both backends and the exporter rely on, one rule per op.

Every fractional length is an integer (so every scale is an exact power of two), every rescale is a
shift equal to the difference of fractional lengths, no int32 accumulator can overflow for any input
codes in the declared ranges, and float values exist only at the graph's quantize and dequantize and
inside the float islands the target declares (which take and give codes).
On the int8 target scales are dyadic (mant * 2**-frac) and a rescale is an integer multiplier M and a
shift n: M is then the nearest integer to the true ratio of steps times 2**n, and acc * M stays exact.
"""
from __future__ import annotations

import numpy as np

from .errors import VerifyError
from .formats import (ACC_RANGE, DTYPE_RANGES, FP64_EXACT_BITS, FRAC_LIMITS, TWIN_FINE_DTYPE, IntRange, Twin, int_range,
                      storage_dtype)
from .islands import ISLAND_FUNCTIONS
from .ir import CLUSTER_OPS, CONV_OPS, WEIGHTED_OPS, Graph, Node, Op, TensorType, int_nonlinear_constants, weight_codes

NARROW = ("int8", "uint8", "int16", "uint16")
MAX_SHIFT = 31
MAX_DYADIC_SHIFT = 62          # acc * M >> n with n < 64 on int64


class _Check:
    def __init__(self, node: Node):
        self.node = node

    def __call__(self, ok: bool, why: str) -> None:
        if not ok:
            n = self.node
            raise VerifyError(f"IR node '%{n.name}' ({n.op.value}): {why}")


def _fracs(t: TensorType) -> list:
    return list(t.frac) if isinstance(t.frac, tuple) else [t.frac]


def _check_type(chk: _Check, t: TensorType, what: str) -> None:
    if t.dtype == "float32":
        return
    chk(t.dtype in DTYPE_RANGES, f"{what} has unknown dtype {t.dtype!r}")
    for f in _fracs(t):
        chk(isinstance(f, (int, np.integer)) and not isinstance(f, bool),
            f"{what} fractional length {f!r} is not an integer, so its scale is not a power of two")
        chk(FRAC_LIMITS[0] <= f <= FRAC_LIMITS[1], f"{what} fractional length {f} outside {FRAC_LIMITS}")
    mant = np.atleast_1d(np.asarray(t.mant))
    chk(np.issubdtype(mant.dtype, np.integer) and bool(np.all(mant >= 1)),
        f"{what} scale mantissa {mant.tolist()} must be positive integers")
    r = DTYPE_RANGES[t.dtype]
    chk(isinstance(t.zp, (int, np.integer)) and r.lo <= t.zp <= r.hi, f"{what} zero point {t.zp!r} outside {t.dtype}")
    chk(t.lo is not None and t.hi is not None and r.lo <= t.lo <= t.hi <= r.hi,
        f"{what} code range [{t.lo}, {t.hi}] is not inside {t.dtype} [{r.lo}, {r.hi}]")


def _shift_ok(chk: _Check, shift, expected) -> None:
    shift, expected = np.atleast_1d(np.asarray(shift)), np.atleast_1d(np.asarray(expected))
    chk(np.issubdtype(shift.dtype, np.integer), f"shift {shift.tolist()} is not an integer")
    chk(shift.shape == expected.shape or shift.size == 1 or expected.size == 1,
        f"shift has {shift.size} entries, expected {expected.size}")
    chk(bool(np.all(shift == expected)), f"shift {shift.tolist()} != frac_in - frac_out {expected.tolist()}")
    chk(bool(np.all(np.abs(shift) <= MAX_SHIFT)), f"shift {shift.tolist()} outside [-{MAX_SHIFT}, {MAX_SHIFT}]")


def _multiplier_ok(chk: _Check, multiplier, shift, ratio, magnitude: int) -> None:
    """M * 2**-n approximates the ratio of steps to the nearest integer M, and acc * M is exact in float64."""
    m, n = np.atleast_1d(np.asarray(multiplier)), np.atleast_1d(np.asarray(shift))
    ratio = np.atleast_1d(np.asarray(ratio, np.float64))
    chk(np.issubdtype(m.dtype, np.integer) and np.issubdtype(n.dtype, np.integer), "multiplier and shift must be integers")
    chk(m.size in (1, ratio.size) and n.size in (1, ratio.size), f"multiplier/shift have {m.size}/{n.size} entries, "
                                                                  f"expected {ratio.size}")
    chk(bool(np.all((n >= 0) & (n <= MAX_DYADIC_SHIFT))), f"shift {n.tolist()} outside [0, {MAX_DYADIC_SHIFT}]")
    err = np.abs(m - ratio * np.exp2(n.astype(np.float64)))
    chk(bool(np.all(err <= 0.5 + 1e-9 * m)), f"multiplier {m.tolist()} x 2^-{n.tolist()} is not the nearest dyadic "
                                               f"to the ratio of steps {ratio.tolist()}")
    chk(int(m.max()) * magnitude < 2**FP64_EXACT_BITS, f"accumulator x multiplier can reach 2^53 ({magnitude} x {m.max()})")


def _same_step(chk: _Check, t: TensorType, out: TensorType) -> None:
    chk(bool(np.all(t.mant_array == out.mant_array)), f"mantissas {t.mant} -> {out.mant} differ, which a shift cannot "
                                                      f"rescale (a multiplier is needed)")


def _acc_fits(chk: _Check, bound, declared: TensorType, what: str) -> None:
    bound = int(np.max(bound))
    chk(bound <= ACC_RANGE.hi, f"{what} can reach {bound} > int32 max {ACC_RANGE.hi}: the accumulator can overflow")
    if declared is not None:
        chk(declared.max_abs >= bound, f"declared accumulator range {declared.max_abs} < provable bound {bound}")


def _codes_in(chk: _Check, a: np.ndarray, r, what: str) -> None:
    chk(np.issubdtype(a.dtype, np.integer) and a.min(initial=0) >= r.lo and a.max(initial=0) <= r.hi,
        f"{what} outside [{r.lo}, {r.hi}]")


def _clusters(chk: _Check, n: Node) -> None:
    t, alpha = n.consts.get("t"), n.consts.get("alpha")
    chk(t is not None and alpha is not None, "missing cluster codes 't' or scale codes 'alpha'")
    block = n.attrs.get("cluster_size")
    chk(isinstance(block, int) and block >= 1, f"cluster_size {block!r} must be a positive integer")
    expected = (t.shape[0], -(-t.shape[1] // block))
    chk(alpha.shape == expected, f"scale codes have shape {list(alpha.shape)}, expected {list(expected)} "
                                 f"(one per cluster of {block} input channels)")
    _codes_in(chk, alpha, int_range(n.attrs["alpha_bits"], signed=False), f"{n.attrs['alpha_bits']}-bit scale codes")


def _weighted(chk: _Check, n: Node, x: TensorType) -> None:
    if n.op in CLUSTER_OPS:
        _clusters(chk, n)
    w, b = n.consts.get("t" if n.op in CLUSTER_OPS else "w"), n.consts.get("b")
    chk(w is not None and b is not None, "missing weight or bias constants")
    chk(x.dtype in NARROW, f"input dtype {x.dtype} is not a narrow code type")
    _codes_in(chk, w, int_range(n.attrs["w_bits"], signed=True, symmetric=not n.attrs.get("w_full_range", False)),
              f"{n.attrs['w_bits']}-bit weight codes")
    chk(b.dtype == np.int32 and b.shape == (w.shape[0],), f"bias must be int32[{w.shape[0]}], got {b.dtype}{list(b.shape)}")
    chk(n.out.dtype == "int32", "accumulator output must be int32")
    expected = tuple(int(x.frac) + int(f) for f in n.attrs["w_frac"])
    chk(tuple(_fracs(n.out)) == expected, f"accumulator frac {_fracs(n.out)} != f_x + f_w {list(expected)}")
    w_mant = np.asarray(n.attrs.get("w_mant", 1), np.int64)
    chk(bool(np.all(n.out.mant_array == w_mant * int(x.mant))), "accumulator mantissa != input mantissa x weight mantissa")
    chk(n.attrs.get("x_zp", 0) == x.zp, f"x_zp {n.attrs.get('x_zp', 0)} != the input's zero point {x.zp}")
    in_ch = x.shape[1]
    if n.op in CONV_OPS:
        g = n.attrs["groups"]
        chk(w.ndim == 4 and w.shape[1] * g == in_ch and w.shape[0] % g == 0,
            f"weight shape {list(w.shape)} with groups={g} does not fit {in_ch} input channels")
    else:
        chk(w.ndim == 2 and w.shape[1] == x.shape[-1], f"weight shape {list(w.shape)} does not fit input {list(x.shape)}")
    l1 = np.abs(weight_codes(n)).reshape(w.shape[0], -1).sum(axis=1)
    _acc_fits(chk, l1 * x.max_abs + np.abs(b.astype(np.int64)), n.out, "a per-channel sum")


def _matmul(chk: _Check, n: Node, ins: list[TensorType]) -> None:
    chk(len(ins) == 2 and all(t.dtype in NARROW for t in ins), "matmul_int takes two narrow code tensors")
    ta, tb = ins
    chk(len(ta.shape) == len(tb.shape) and ta.shape[-1] == tb.shape[-2],
        f"shapes {ta.short()} and {tb.short()} do not multiply")
    chk(n.out.dtype == "int32", "accumulator output must be int32")
    chk(n.out.frac == int(ta.frac) + int(tb.frac), f"accumulator frac {n.out.frac} != f_a + f_b {int(ta.frac) + int(tb.frac)}")
    chk(n.out.mant == int(ta.mant) * int(tb.mant), "accumulator mantissa != the product of the inputs' mantissas")
    chk((n.attrs.get("a_zp", 0), n.attrs.get("b_zp", 0)) == (ta.zp, tb.zp), "a_zp/b_zp differ from the inputs' zero points")
    _acc_fits(chk, int(ta.shape[-1]) * ta.max_abs * tb.max_abs, n.out, "a dot product")


def _island(chk: _Check, n: Node, ins: list[TensorType], allowed: set) -> None:
    fn = n.attrs.get("fn")
    needs_mask = fn == "masked_mean" or "on_invalid" in n.attrs
    chk(len(ins) == (2 if needs_mask else 1), "a token mask input goes with masked_mean and a key-masked softmax")
    chk(fn in ISLAND_FUNCTIONS, f"unknown float island function {fn!r}; known: {list(ISLAND_FUNCTIONS)}")
    chk(fn in allowed, f"the target does not declare {fn!r} as a float island (it allows {sorted(allowed) or 'none'})")
    chk(ins[0].dtype in NARROW and n.out.dtype in NARROW, "a float island takes and gives narrow codes")
    if "mask" in n.consts:
        shape = tuple(1 if d is None else d for d in ins[0].shape)
        try:
            fits = np.broadcast_shapes(n.consts["mask"].shape, shape) == shape
        except ValueError:
            fits = False
        chk(fits, f"the softmax mask of shape {list(n.consts['mask'].shape)} does not broadcast to {ins[0].short()}")
    for k in ("weight", "bias"):
        if k in n.consts:
            chk(n.consts[k].shape == (ins[0].shape[-1],), f"LayerNorm {k} has shape {list(n.consts[k].shape)}, "
                                                           f"expected [{ins[0].shape[-1]}]")


def _int_nonlinear(chk: _Check, n: Node, ins: list[TensorType]) -> None:
    x = ins[0]
    needs_mask = n.op is Op.MASKED_MEAN_INT or "key_mask" in n.attrs
    chk(len(ins) == (2 if needs_mask else 1), "a token mask input goes with masked_mean and a key-masked softmax")
    chk(x.dtype in NARROW and n.out.dtype in NARROW, "an integer nonlinearity takes and gives narrow codes")
    chk(x.mant == 1 and x.zp == 0 and n.out.mant == 1 and n.out.zp == 0, "needs power-of-two formats (no mantissa "
                                                                          "or zero point)")
    try:
        int_nonlinear_constants(n, x)
    except (ValueError, KeyError) as exc:
        chk(False, f"no integer kernel for these formats: {exc}")
    if n.op is Op.LAYERNORM_INT:
        chk(n.attrs["n"] == x.shape[-1], f"n={n.attrs['n']} != the last axis {x.shape[-1]}")
        chk(n.consts["gamma"].shape == n.consts["beta"].shape == (x.shape[-1],), "gamma/beta shape != the last axis")


def _twin(chk: _Check, n: Node, ins: list[TensorType]) -> None:
    x = ins[0]
    if n.op is Op.TWIN_QUANT:
        chk(n.out.twin is not None and x.twin is None, "twin_quant turns fine codes into twin codes")
        bits, m, signed = n.out.twin
        fine = Twin(bits, m, signed).fine_range
        chk(x.dtype == TWIN_FINE_DTYPE and x.lo >= fine.lo and x.hi <= fine.hi,
            f"fine codes {x.short()} [{x.lo}, {x.hi}] outside the twin's fine range [{fine.lo}, {fine.hi}]")
        chk(n.out.dtype == storage_dtype(bits, False) and (n.out.lo, n.out.hi) == (0, 2 ** bits - 1),
            f"twin codes must be u{bits}")
    else:
        chk(x.twin is not None, "twin_expand reads twin codes")
        bits, m, signed = x.twin
        fine = Twin(bits, m, signed).fine_range
        chk(n.out.twin is None and n.out.dtype == TWIN_FINE_DTYPE and (n.out.lo, n.out.hi) == (fine.lo, fine.hi),
            f"expanded codes must be {TWIN_FINE_DTYPE} in [{fine.lo}, {fine.hi}]")
    chk(n.out.frac == x.frac, "twin codes keep the small step's fractional length")


def _const(chk: _Check, n: Node) -> None:
    codes = n.consts.get("codes")
    chk(codes is not None and tuple(codes.shape) == tuple(n.out.shape), "constant codes missing or of the wrong shape")
    chk(n.out.shape[0] == 1, "a constant has a batch dim of 1")
    _codes_in(chk, codes, IntRange(n.out.lo, n.out.hi), "constant codes")


def _rule(n: Node, ins: list[TensorType], chk: _Check, allowed: set = frozenset()) -> None:
    a, op = n.attrs, n.op
    if op is Op.QUANTIZE:
        chk(len(ins) == 1 and ins[0].dtype == "float32", "quantize takes the float graph input")
        chk(n.out.dtype in NARROW, "quantize must produce narrow codes")
    elif op is Op.DEQUANTIZE:
        chk(ins[0].dtype in NARROW, "dequantize takes narrow codes")
        chk(n.out.dtype == "float32", "dequantize produces float32")
    elif op in WEIGHTED_OPS:
        _weighted(chk, n, ins[0])
    elif op is Op.REQUANT:
        chk(ins[0].dtype == "int32", "requant takes an int32 accumulator")
        if "multiplier" in a:
            _multiplier_ok(chk, a["multiplier"], a["shift"], ins[0].step / n.out.step, ins[0].max_abs)
            return
        _same_step(chk, ins[0], n.out)
        _shift_ok(chk, a["shift"], ins[0].frac_array - int(n.out.frac))
        left = -np.minimum(np.asarray(a["shift"]), 0)
        _acc_fits(chk, ins[0].max_abs * (2 ** np.max(left)), None, "a left-shifted accumulator")
    elif op is Op.ADD_INT:
        chk(len(ins) == 2 and all(t.dtype in NARROW for t in ins), "add_int takes two narrow code tensors")
        if "multipliers" in a:
            chk(tuple(a["in_zp"]) == tuple(t.zp for t in ins), f"in_zp {a['in_zp']} != the inputs' zero points")
            for t, m in zip(ins, a["multipliers"]):
                _multiplier_ok(chk, m, a["shift"], t.step / n.out.step, 2 * t.max_abs)
            _acc_fits(chk, sum(t.max_abs * m for t, m in zip(ins, a["multipliers"])), None, "the scaled sum")
            return
        for t in ins:
            _same_step(chk, t, n.out)
        common = max(int(t.frac) for t in ins)
        chk(tuple(a["align"]) == tuple(common - int(t.frac) for t in ins), f"align shifts {a['align']} do not reach frac {common}")
        _shift_ok(chk, a["shift"], common - int(n.out.frac))
        _acc_fits(chk, sum(t.max_abs << s for t, s in zip(ins, a["align"])), None, "the aligned sum")
    elif op is Op.AVGPOOL_INT:
        chk(ins[0].dtype in NARROW, "avgpool_int takes narrow codes")
        window = a["kernel"][0] * a["kernel"][1] * ins[0].max_abs
        _acc_fits(chk, window, None, "the window sum")
        chk(a.get("x_zp", 0) == ins[0].zp, f"x_zp {a.get('x_zp', 0)} != the input's zero point {ins[0].zp}")
        if "multiplier" in a:
            ratio = ins[0].step * 2.0 ** -int(a["divisor_log2"]) / n.out.step
            _multiplier_ok(chk, a["multiplier"], a["shift"], ratio, window)
            return
        _same_step(chk, ins[0], n.out)
        _shift_ok(chk, a["shift"], int(ins[0].frac) + int(a["divisor_log2"]) - int(n.out.frac))
    elif op is Op.MATMUL_INT:
        _matmul(chk, n, ins)
    elif op is Op.FLOAT_ISLAND:
        _island(chk, n, ins, allowed)
    elif op in (Op.SOFTMAX_INT, Op.GELU_INT, Op.LAYERNORM_INT, Op.MASKED_MEAN_INT, Op.L2NORM_INT):
        _int_nonlinear(chk, n, ins)
    elif op in (Op.TWIN_QUANT, Op.TWIN_EXPAND):
        _twin(chk, n, ins)
    elif op is Op.GATHER:
        chk(len(ins) == 1 and ins[0].dtype == "int64", "gather reads integer token ids")
        table = n.consts.get("table")
        chk(table is not None and table.ndim == 2 and n.out.shape == ins[0].shape + (table.shape[1],),
            "the code table must be [vocabulary, width] and the output [*ids, width]")
        _codes_in(chk, table, IntRange(n.out.lo, n.out.hi), "table codes")
    elif op is Op.TOKEN_MASK:
        chk(len(ins) == 1 and ins[0].dtype == "int64", "token_mask reads integer token ids")
        chk(a.get("compare") in ("ne", "eq", "gt", "ge", "lt", "le"), f"unknown comparison {a.get('compare')!r}")
        chk(n.out.dtype == "uint8" and (n.out.lo, n.out.hi) == (0, 1), "a token mask is u8 0/1")
    elif op is Op.CONST:
        chk(not ins, "a constant takes no inputs")
        _const(chk, n)
    elif op in (Op.MAXPOOL_INT, Op.PAD_INT, Op.CLAMP_INT, Op.RESHAPE, Op.CONCAT_INT, Op.PERMUTE, Op.SELECT,
                Op.EXPAND_BATCH):
        if op is Op.EXPAND_BATCH:
            chk(len(ins) == 2 and ins[0].shape[0] == 1, "expand_batch repeats a batch-1 tensor to another's batch")
            ins = ins[:1]
        if op is Op.PERMUTE:
            chk(tuple(a["perm"])[0] == 0, f"permute {list(a['perm'])} moves the batch axis")
        for t in ins:
            chk(t.dtype == n.out.dtype and t.frac == n.out.frac and t.mant == n.out.mant and t.zp == n.out.zp,
                f"input {t.short()} and output {n.out.short()} must share dtype, scale and zero point")
        if op is Op.CLAMP_INT:
            chk(n.out.lo == a["lo"] and n.out.hi == a["hi"], "clamp bounds differ from the output range")
    else:
        chk(False, "unknown op")


def verify(g: Graph) -> None:
    declared = str((g.target or {}).get("float islands", "-"))
    allowed = set() if declared == "-" else set(declared.split(","))
    types = {g.input_name: g.input_type}
    seen_names = {g.input_name}
    for n in g.nodes:
        chk = _Check(n)
        chk(isinstance(n.op, Op), f"unknown op {n.op!r}")
        chk(n.name not in seen_names, "duplicate node name")
        for i in n.inputs:
            chk(i in types, f"input %{i} is not defined before this node")
        ins = [types[i] for i in n.inputs]
        if n.out.dtype == "float32":
            chk(n.op is Op.DEQUANTIZE, "a float tensor outside the graph's dequantize (no float islands are declared)")
        if n.op is not Op.QUANTIZE:
            chk(all(t.dtype != "float32" for t in ins), "float input outside the graph's quantize")
        if n.op is not Op.TWIN_EXPAND:
            chk(all(t.twin is None for t in ins), "twin codes may only be read by twin_expand")
        _rule(n, ins, chk, allowed)     # op rules first: they explain *why* a range is out of bounds
        _check_type(chk, n.out, "output")
        seen_names.add(n.name)
        types[n.name] = n.out
    if g.output not in types:
        raise VerifyError(f"graph output %{g.output} is not defined")
    if types[g.output].dtype != "float32":
        raise VerifyError(f"graph output %{g.output} must be dequantized to float32")
