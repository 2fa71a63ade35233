"""fxq.verify, rule by rule: each case takes a valid integer graph, breaks exactly one property, and the
verifier must refuse it naming the node and the reason.

The base graphs come from fxq.compile on tiny models (so they are what the lowering really emits), plus
two built by hand through fxq.ir for the bounds a tiny model cannot reach. Every case first checks that
its unmutated copy verifies, so no case passes because its base was already broken. Only the public IR
(Graph, Node, TensorType, Op, ``graph.verify()``) is used: the verifier's internals may change freely.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from conftest import tiny
from fxq.errors import VerifyError
from fxq.ir import Graph, Node, Op, TensorType

X = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def qm():
    return fxq.compile(tiny("residual"), X, progress=False)


# -- base graphs -----------------------------------------------------------------------------------
class _Pointwise(nn.Module):
    """Zero padding, max-pool, a concat and a standalone ReLU6 (clamp_int)."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((1, 0, 1, 0))
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.left, self.right = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 3, padding=1)
        self.fc = nn.Linear(4 * 7 * 7, 5)

    def forward(self, x):
        y = F.max_pool2d(torch.relu(self.a(self.pad(x))), 2)
        y = F.relu6(F.max_pool2d(torch.cat([self.left(y), self.right(y)], 1), 2))
        return self.fc(torch.flatten(y, 1))


class _Clusters(nn.Module):
    """dfp-cluster keeps the first and last layer at 8 bits: the middle conv and linear are clusters."""

    def __init__(self):
        super().__init__()
        self.first, self.mid = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 7 * 7, 16), nn.Linear(16, 5)

    def forward(self, x):
        y = F.max_pool2d(torch.relu(self.mid(torch.relu(self.first(x)))), 4)
        return self.fc2(torch.relu(self.fc1(torch.flatten(y, 1))))


def _vit():
    from fxq.zoo.vit import ViT
    torch.manual_seed(1)
    return ViT(dim=16, depth=1, heads=2, mlp_ratio=2, patch=7).eval()


def _text():
    from fxq.zoo.text import TextEncoder, random_sentences
    torch.manual_seed(0)
    return fxq.compile(TextEncoder(depth=1).eval(), random_sentences(16, seed=1), progress=False).ir


def _seeded(model_cls):
    torch.manual_seed(0)
    return model_cls().eval()


def _hand_add() -> Graph:
    """Two quantizations of the input at f=4 added (no alignment) and dequantized."""
    x = TensorType("float32", (None, 4))
    q = lambda name: Node(name, Op.QUANTIZE, ["x"], TensorType("int8", (None, 4), 4, -127, 127),  # noqa: E731
                          {"rounding": "half_even"})
    add = Node("add", Op.ADD_INT, ["qa", "qb"], TensorType("int8", (None, 4), 3, -128, 127),
               {"align": (0, 0), "shift": 1, "rounding": "half_even"})
    out = Node("output", Op.DEQUANTIZE, ["add"], TensorType("float32", (None, 4)))
    return Graph("x", x, [q("qa"), q("qb"), add, out], "output", {"name": "hand"})


def _hand_matmul(k: int = 16) -> Graph:
    """i8[N,2,k] @ its reshape i8[N,k,2] accumulated in int32, requantized and dequantized."""
    x = TensorType("float32", (None, 2, k))
    qa = Node("qa", Op.QUANTIZE, ["x"], TensorType("int8", (None, 2, k), 0, -127, 127), {"rounding": "half_even"})
    qb = Node("qb", Op.RESHAPE, ["qa"], TensorType("int8", (None, k, 2), 0, -127, 127), {"shape": (-1, k, 2)})
    acc = 2**31 - 1
    mm = Node("mm", Op.MATMUL_INT, ["qa", "qb"], TensorType("int32", (None, 2, 2), 0, -acc, acc))
    rq = Node("rq", Op.REQUANT, ["mm"], TensorType("int8", (None, 2, 2), 0, -128, 127),
              {"shift": 0, "rounding": "half_even"})
    out = Node("output", Op.DEQUANTIZE, ["rq"], TensorType("float32", (None, 2, 2)))
    return Graph("x", x, [qa, qb, mm, rq, out], "output", {"name": "hand"})


BUILDERS = {
    "int8": lambda: fxq.compile(tiny("residual"), X, "int8", progress=False).ir,
    "pointwise": lambda: fxq.compile(_seeded(_Pointwise), X * 4, progress=False).ir,
    "clusters": lambda: fxq.compile(_seeded(_Clusters), X, "dfp-cluster", progress=False).ir,
    "vit": lambda: fxq.compile(_vit(), X, progress=False).ir,
    "vit_islands": lambda: fxq.compile(_vit(), X, float_islands="all", progress=False).ir,
    "text": _text,
    "hand_add": _hand_add,
    "hand_matmul": _hand_matmul,
}


class _Bases(dict):
    """Base graphs, each built on first use."""

    def __missing__(self, key):
        self[key] = BUILDERS[key]()
        return self[key]


@pytest.fixture(scope="module")
def bases(qm):
    b = _Bases()
    b["cnn"] = qm.ir          # the tiny residual on shift-int: conv, requant, add_int, avgpool, reshape, linear
    return b


# -- helpers the mutations use ---------------------------------------------------------------------
def first(g: Graph, op: Op, i: int = 0, **attrs) -> Node:
    """The i-th node of ``op`` (whose attrs include ``attrs``); fails, rather than skips, if there is none."""
    nodes = [n for n in g.nodes if n.op is op and all(getattr(n.attrs, k, None) == v for k, v in attrs.items())]
    assert len(nodes) > i, f"the base graph has no {op.value} node #{i} with {attrs}"
    return nodes[i]


def retype(n: Node, **fields) -> str:
    n.out = replace(n.out, **fields)
    return n.name


def nearest(ratio, shift: int) -> np.ndarray:
    """The nearest integer multiplier M with M * 2**-shift ~ ratio."""
    return np.round(np.asarray(ratio, np.float64) * 2.0**shift).astype(np.int64)


# -- the table: (base graph, mutation returning the node the error must name, reason substring) -------
CASES = []


def case(base: str, reason: str, marks=()):
    def register(mutate):
        CASES.append(pytest.param(base, mutate, reason, id=mutate.__name__, marks=marks))
        return mutate
    return register


# graph-level rules
@case("cnn", "unknown op")
def op_not_in_the_enum(g):
    n = first(g, Op.REQUANT)
    n.op = "requantize"
    return n.name


@case("cnn", "duplicate node name")
def duplicate_name(g):
    g.nodes[2].name = g.nodes[1].name
    return g.nodes[2].name


@case("cnn", "is not defined before this node")
def undefined_input(g):
    n = first(g, Op.REQUANT)
    n.inputs = ["nowhere"]
    return n.name


@case("cnn", "is not defined before this node")
def input_defined_after_its_reader(g):
    rq = first(g, Op.REQUANT)
    conv = g.node(rq.inputs[0])
    i, j = g.nodes.index(conv), g.nodes.index(rq)
    g.nodes[i], g.nodes[j] = rq, conv
    return rq.name


@case("cnn", "float tensor outside the graph's dequantize")
def float_tensor_in_the_middle(g):
    return retype(first(g, Op.REQUANT), dtype="float32", frac=None, lo=None, hi=None)


@case("cnn", "float input outside the graph's quantize")
def float_input_read_by_a_conv(g):
    n = first(g, Op.CONV2D_INT)
    n.inputs = [g.input_name]
    return n.name


@case("vit", "twin codes may only be read by twin_expand")
def twin_codes_read_by_a_matmul(g):
    tq = first(g, Op.TWIN_QUANT)
    expand = next(n for n in g.nodes if n.inputs == [tq.name])
    reader = next(n for n in g.nodes if expand.name in n.inputs)
    reader.inputs = [tq.name if i == expand.name else i for i in reader.inputs]
    return reader.name


@case("cnn", "is not defined")
def graph_output_undefined(g):
    g.output = "nowhere"
    return "nowhere"


@case("cnn", "must be dequantized to float32")
def graph_output_not_float(g):
    g.output = first(g, Op.DEQUANTIZE).inputs[0]
    g.nodes = [n for n in g.nodes if n.op is not Op.DEQUANTIZE]
    return g.output


# tensor types, checked on every node's output
@case("cnn", "unknown dtype")
def unknown_dtype(g):
    return retype(first(g, Op.REQUANT), dtype="int12")


@case("cnn", "is not an integer")
def fractional_length_not_an_integer(g):
    return retype(g.nodes[0], frac=3.5)


@case("cnn", "outside")
def fractional_length_out_of_limits(g):
    return retype(g.nodes[0], frac=200)


@case("cnn", "mantissa")
def mantissa_not_positive(g):
    return retype(g.nodes[0], mant=0)


@case("cnn", "zero point")
def zero_point_outside_the_dtype(g):
    return retype(g.nodes[0], zp=300)


@case("cnn", "code range")
def code_range_outside_the_dtype(g):
    return retype(g.nodes[0], lo=-200)


@case("cnn", "code range")
def code_range_empty(g):
    return retype(g.nodes[0], lo=5, hi=4)


# quantize / dequantize
@case("cnn", "quantize takes the float graph input")
def quantize_reads_codes(g):
    g.input_type = TensorType("int8", g.input_type.shape, 0, -128, 127)
    return g.nodes[0].name


@case("cnn", "quantize must produce narrow codes")
def quantize_to_int32(g):
    return retype(g.nodes[0], dtype="int32")


@case("cnn", "dequantize takes narrow codes")
def dequantize_reads_an_accumulator(g):
    dq = first(g, Op.DEQUANTIZE)
    dq.inputs = [g.node(dq.inputs[0]).inputs[0]]
    return dq.name


@case("cnn", "dequantize produces float32")
def dequantize_to_codes(g):
    dq = first(g, Op.DEQUANTIZE)
    return retype(dq, **{k: getattr(g.node(dq.inputs[0]).out, k) for k in ("dtype", "frac", "lo", "hi")})


# conv2d_int / linear_int
@case("cnn", "missing weight or bias")
def weighted_without_bias(g):
    n = first(g, Op.CONV2D_INT)
    del n.consts["b"]
    return n.name


@case("cnn", "not a narrow code type")
def weighted_reads_an_accumulator(g):
    n = first(g, Op.CONV2D_INT, 1)
    n.inputs = [first(g, Op.CONV2D_INT).name]
    return n.name


@case("cnn", "weight codes outside")
def weight_code_outside_the_symmetric_range(g):
    n = first(g, Op.CONV2D_INT)
    n.consts["w"] = n.consts["w"].copy()
    n.consts["w"].flat[0] = -128
    return n.name


@case("cnn", "bias must be int32")
def bias_not_int32(g):
    n = first(g, Op.LINEAR_INT)
    n.consts["b"] = n.consts["b"].astype(np.int64)
    return n.name


@case("cnn", "bias must be int32")
def bias_of_the_wrong_length(g):
    n = first(g, Op.LINEAR_INT)
    n.consts["b"] = n.consts["b"][:-1]
    return n.name


@case("cnn", "accumulator output must be int32")
def weighted_output_not_int32(g):
    return retype(first(g, Op.CONV2D_INT), dtype="int16", lo=-100, hi=100)


@case("cnn", "f_x + f_w")
def accumulator_frac_not_the_sum(g):
    n = first(g, Op.CONV2D_INT)
    return retype(n, frac=tuple(f + 1 for f in n.out.frac_array.tolist()))


@case("cnn", "accumulator mantissa")
def accumulator_mantissa_not_the_product(g):
    return retype(first(g, Op.CONV2D_INT), mant=3)


@case("cnn", "x_zp")
def weighted_zero_point_not_the_inputs(g):
    n = first(g, Op.CONV2D_INT)
    n.attrs = n.attrs.replace(x_zp=3)
    return n.name


@case("cnn", "does not fit")
def conv_groups_do_not_fit_the_channels(g):
    n = first(g, Op.CONV2D_INT, 1)
    n.attrs = n.attrs.replace(groups=2)
    return n.name


@case("cnn", "does not fit input")
def linear_weight_does_not_fit_the_input(g):
    n = first(g, Op.LINEAR_INT)
    n.consts["w"] = n.consts["w"][:, :-1]
    return n.name


@case("cnn", "overflow")
def conv_accumulator_can_overflow(g):
    n = first(g, Op.CONV2D_INT)
    n.consts["b"] = np.full_like(n.consts["b"], 2**31 - 10)
    return n.name


@case("cnn", "declared accumulator range")
def conv_declares_less_than_its_bound(g):
    return retype(first(g, Op.CONV2D_INT), lo=-10, hi=10)


# conv2d_cluster / linear_cluster (dfp-cluster)
@case("clusters", "missing cluster codes")
def cluster_without_scale_codes(g):
    n = first(g, Op.CONV2D_CLUSTER)
    del n.consts["alpha"]
    return n.name


@case("clusters", "cluster_size")
def cluster_size_zero(g):
    n = first(g, Op.CONV2D_CLUSTER)
    n.attrs = n.attrs.replace(cluster_size=0)
    return n.name


@case("clusters", "scale codes have shape")
def conv_cluster_scale_codes_of_the_wrong_shape(g):
    n = first(g, Op.CONV2D_CLUSTER)
    n.consts["alpha"] = n.consts["alpha"][:-1]
    return n.name


@case("clusters", "scale codes have shape")
def linear_cluster_scale_codes_of_the_wrong_shape(g):
    n = first(g, Op.LINEAR_CLUSTER)
    n.consts["alpha"] = n.consts["alpha"][:, :-1]
    return n.name


@case("clusters", "scale codes outside")
def cluster_scale_code_outside_its_bits(g):
    n = first(g, Op.CONV2D_CLUSTER)
    n.consts["alpha"] = n.consts["alpha"].astype(np.int64)
    n.consts["alpha"].flat[0] = 2 ** n.attrs.alpha_bits
    return n.name


@case("clusters", "weight codes outside")
def ternary_code_of_two(g):
    n = first(g, Op.LINEAR_CLUSTER)
    n.consts["t"] = n.consts["t"].copy()
    n.consts["t"].flat[0] = 2
    return n.name


# requant, shift form
@case("cnn", "requant takes an int32 accumulator")
def requant_reads_codes(g):
    n = first(g, Op.REQUANT)
    n.inputs = [g.nodes[0].name]
    return n.name


@case("cnn", "is not an integer")
def requant_shift_not_an_integer(g):
    n = first(g, Op.REQUANT)
    n.attrs = n.attrs.replace(shift=np.asarray(n.attrs.shift, np.float64))
    return n.name


@case("cnn", "entries")
def requant_shift_with_one_entry_too_many(g):
    n = first(g, Op.REQUANT)
    shifts = tuple(np.atleast_1d(n.attrs.shift).tolist())
    assert len(shifts) > 1, "the first requant has per-channel shifts"
    n.attrs = n.attrs.replace(shift=shifts + shifts[:1])
    return n.name


@case("cnn", "frac_in - frac_out")
def requant_shift_not_the_frac_difference(g):
    n = first(g, Op.REQUANT)
    n.attrs = n.attrs.replace(shift=tuple(s + 1 for s in np.atleast_1d(n.attrs.shift).tolist()))
    return n.name


@case("cnn", "outside")
def requant_shift_past_the_limit(g):
    """A shift that does equal frac_in - frac_out but is longer than the backends can shift."""
    n = first(g, Op.REQUANT)
    f_in = g.node(n.inputs[0]).out.frac_array
    out_frac = int(f_in.min()) - 40
    n.attrs = n.attrs.replace(shift=tuple((f_in - out_frac).tolist()))
    return retype(n, frac=out_frac)


@case("cnn", "left-shifted accumulator")
def requant_left_shift_can_overflow(g):
    n = first(g, Op.REQUANT)
    f_in = g.node(n.inputs[0]).out.frac_array
    out_frac = int(f_in.max()) + 20
    n.attrs = n.attrs.replace(shift=tuple((f_in - out_frac).tolist()))
    return retype(n, frac=out_frac)


@case("cnn", "mantissas")
def requant_between_different_mantissas(g):
    return retype(first(g, Op.REQUANT), mant=3)


# requant, dyadic form (int8 target)
@case("int8", "must be integers")
def requant_multiplier_not_an_integer(g):
    n = first(g, Op.REQUANT)
    n.attrs = n.attrs.replace(multiplier=np.asarray(n.attrs.multiplier, np.float64) + 0.25)
    return n.name


@case("int8", "entries")
def requant_multiplier_with_one_entry_too_many(g):
    n = first(g, Op.REQUANT)
    m = tuple(np.atleast_1d(n.attrs.multiplier).tolist())
    n.attrs = n.attrs.replace(multiplier=m + m[:1])
    return n.name


@case("int8", "outside [0,")
def requant_dyadic_shift_past_the_limit(g):
    n = first(g, Op.REQUANT)
    n.attrs = n.attrs.replace(shift=63)
    return n.name


@case("int8", "not the nearest dyadic")
def requant_multiplier_off_by_one(g):
    n = first(g, Op.REQUANT)
    n.attrs = n.attrs.replace(multiplier=tuple(m + 1 for m in np.atleast_1d(n.attrs.multiplier).tolist()))
    return n.name


@case("int8", "2^53")
def requant_multiplier_too_long_for_float64(g):
    """The nearest multiplier at shift 62 is exact as a ratio, but acc * M no longer fits 53 bits."""
    n = first(g, Op.REQUANT)
    ratio = g.node(n.inputs[0]).out.step / n.out.step
    n.attrs = n.attrs.replace(shift=62)
    n.attrs = n.attrs.replace(multiplier=tuple(nearest(ratio, 62).tolist()))
    return n.name


# add_int
@case("cnn", "add_int takes two narrow code tensors")
def add_with_one_input(g):
    n = first(g, Op.ADD_INT)
    n.inputs = n.inputs[:1]
    return n.name


@case("cnn", "mantissas")
def add_between_different_mantissas(g):
    return retype(first(g, Op.ADD_INT), mant=3)


@case("cnn", "align shifts")
def add_align_shifts_wrong(g):
    n = first(g, Op.ADD_INT)
    n.attrs = n.attrs.replace(align=tuple(a + 1 for a in n.attrs.align))
    return n.name


@case("cnn", "frac_in - frac_out")
def add_shift_not_the_frac_difference(g):
    n = first(g, Op.ADD_INT)
    n.attrs = n.attrs.replace(shift=int(np.max(n.attrs.shift)) + 1)
    return n.name


@case("hand_add", "aligned sum")
def add_aligned_sum_can_overflow(g):
    """One input 26 fractional bits finer: the other's codes << 26 leave int32."""
    qb, add = g.node("qb"), g.node("add")
    qb.out = replace(qb.out, frac=30)
    add.attrs = add.attrs.replace(align=(26, 0), shift=27)
    return add.name


@case("int8", "in_zp")
def add_zero_points_not_the_inputs(g):
    n = first(g, Op.ADD_INT)
    n.attrs = n.attrs.replace(in_zp=tuple(z + 1 for z in n.attrs.in_zp))
    return n.name


@case("int8", "not the nearest dyadic")
def add_multiplier_off_by_one(g):
    n = first(g, Op.ADD_INT)
    m = list(n.attrs.multipliers)
    m[0] += 1
    n.attrs = n.attrs.replace(multipliers=tuple(m))
    return n.name


@case("int8", "scaled sum")
def add_scaled_sum_can_overflow(g):
    """Both multipliers stay the nearest ones, 12 bits longer: codes x M leave int32."""
    n = first(g, Op.ADD_INT)
    shift = int(n.attrs.shift) + 12
    n.attrs = n.attrs.replace(multipliers=tuple(int(nearest(g.node(i).out.step / n.out.step, shift)) for i in n.inputs))
    n.attrs = n.attrs.replace(shift=shift)
    return n.name


# avgpool_int
@case("cnn", "avgpool_int takes narrow codes")
def avgpool_reads_an_accumulator(g):
    n = first(g, Op.AVGPOOL_INT)
    n.inputs = [first(g, Op.CONV2D_INT).name]
    return n.name


@case("cnn", "window sum")
def avgpool_window_sum_can_overflow(g):
    n = first(g, Op.AVGPOOL_INT)
    n.attrs = n.attrs.replace(kernel=(4096, 4096))
    return n.name


@case("cnn", "x_zp")
def avgpool_zero_point_not_the_inputs(g):
    n = first(g, Op.AVGPOOL_INT)
    n.attrs = n.attrs.replace(x_zp=3)
    return n.name


@case("cnn", "frac_in - frac_out")
def avgpool_shift_not_the_frac_difference(g):
    n = first(g, Op.AVGPOOL_INT)
    n.attrs = n.attrs.replace(shift=int(np.max(n.attrs.shift)) + 1)
    return n.name


@case("cnn", "mantissas")
def avgpool_between_different_mantissas(g):
    return retype(first(g, Op.AVGPOOL_INT), mant=3)


@case("int8", "not the nearest dyadic")
def avgpool_multiplier_off_by_one(g):
    n = first(g, Op.AVGPOOL_INT)
    n.attrs = n.attrs.replace(multiplier=int(np.max(n.attrs.multiplier)) + 1)
    return n.name


# matmul_int
@case("vit", "matmul_int takes two narrow code tensors")
def matmul_reads_an_accumulator(g):
    n = first(g, Op.MATMUL_INT)
    n.inputs = [first(g, Op.LINEAR_INT).name, n.inputs[1]]
    return n.name


@case("vit", "do not multiply")
def matmul_shapes_do_not_multiply(g):
    n = first(g, Op.MATMUL_INT)
    n.inputs = [n.inputs[0], n.inputs[0]]
    return n.name


@case("vit", "accumulator output must be int32")
def matmul_output_not_int32(g):
    return retype(first(g, Op.MATMUL_INT), dtype="int16", lo=-100, hi=100)


@case("vit", "f_a + f_b")
def matmul_frac_not_the_sum(g):
    n = first(g, Op.MATMUL_INT)
    return retype(n, frac=int(n.out.frac) + 1)


@case("vit", "mantissa")
def matmul_mantissa_not_the_product(g):
    return retype(first(g, Op.MATMUL_INT), mant=3)


@case("vit", "a_zp/b_zp")
def matmul_zero_points_not_the_inputs(g):
    n = first(g, Op.MATMUL_INT)
    n.attrs = n.attrs.replace(a_zp=1)
    return n.name


@case("vit", "declared accumulator range")
def matmul_declares_less_than_its_bound(g):
    return retype(first(g, Op.MATMUL_INT), lo=-10, hi=10)


@case("hand_matmul", "overflow")
def matmul_reduction_too_long_for_int32(g):
    """2**18 products of 127 x 127 can exceed int32."""
    k = 2**18
    g.input_type = replace(g.input_type, shape=(None, 2, k))
    retype(g.node("qa"), shape=(None, 2, k))
    retype(g.node("qb"), shape=(None, k, 2))
    return "mm"


# float islands
@case("vit_islands", "a token mask input goes with")
def island_masked_mean_without_its_mask(g):
    n = first(g, Op.FLOAT_ISLAND, fn="softmax")
    n.attrs = n.attrs.replace(fn="masked_mean")
    return n.name


@case("vit_islands", "unknown float island function")
def island_of_an_unknown_function(g):
    n = first(g, Op.FLOAT_ISLAND, fn="gelu")
    n.attrs = n.attrs.replace(fn="tanh")
    return n.name


@case("vit_islands", "does not declare 'softmax'")
def island_the_target_does_not_declare(g):
    g.target = dict(g.target, **{"float islands": "gelu,layer_norm"})
    return first(g, Op.FLOAT_ISLAND, fn="softmax").name


@case("vit_islands", "does not declare")
def island_on_a_target_without_islands(g):
    g.target = dict(g.target, **{"float islands": "-"})
    return first(g, Op.FLOAT_ISLAND).name


@case("vit_islands", "a float island takes and gives narrow codes")
def island_output_int32(g):
    return retype(first(g, Op.FLOAT_ISLAND, fn="gelu"), dtype="int32")


@case("vit_islands", "does not broadcast")
def island_softmax_mask_of_the_wrong_shape(g):
    n = first(g, Op.FLOAT_ISLAND, fn="softmax")
    n.consts["mask"] = np.zeros((3, 5))
    return n.name


@case("vit_islands", "LayerNorm weight has shape")
def island_layer_norm_weight_of_the_wrong_length(g):
    n = first(g, Op.FLOAT_ISLAND, fn="layer_norm")
    n.consts["weight"] = n.consts["weight"][:-1]
    return n.name


# integer nonlinearities
@case("vit", "a token mask input goes with")
def softmax_int_with_an_unexpected_mask(g):
    n = first(g, Op.SOFTMAX_INT)
    n.inputs = n.inputs + n.inputs
    return n.name


@case("text", "a token mask input goes with")
def masked_mean_int_without_its_mask(g):
    n = first(g, Op.MASKED_MEAN_INT)
    n.inputs = n.inputs[:1]
    return n.name


@case("text", "a token mask input goes with")
def key_masked_softmax_int_without_its_mask(g):
    n = next((n for n in g.nodes if n.op is Op.SOFTMAX_INT and getattr(n.attrs, "key_mask", None) is not None), None)
    assert n is not None, "the text encoder has a key-masked softmax"
    n.inputs = n.inputs[:1]
    return n.name


@case("vit", "takes and gives narrow codes")
def gelu_int_output_int32(g):
    return retype(first(g, Op.GELU_INT), dtype="int32")


@case("vit", "power-of-two formats")
def gelu_int_with_a_mantissa(g):
    return retype(first(g, Op.GELU_INT), mant=3)


@case("vit", "no integer kernel")
def softmax_int_output_step_without_a_kernel(g):
    return retype(first(g, Op.SOFTMAX_INT), frac=40)


@case("text", "no integer kernel")
def l2norm_int_output_step_without_a_kernel(g):
    n = first(g, Op.L2NORM_INT)
    return retype(n, frac=int(g.node(n.inputs[0]).out.frac) + 60)


@case("vit", "the last axis")
def layernorm_int_n_not_the_last_axis(g):
    n = first(g, Op.LAYERNORM_INT)
    n.attrs = n.attrs.replace(n=n.attrs.n - 1)
    return n.name


@case("vit", "gamma/beta shape")
def layernorm_int_gamma_of_the_wrong_length(g):
    n = first(g, Op.LAYERNORM_INT)
    n.consts["gamma"], n.consts["beta"] = n.consts["gamma"][:-1], n.consts["beta"][:-1]
    return n.name


# twin-uniform codes
@case("vit", "twin_quant turns fine codes into twin codes")
def twin_quant_without_twin_output(g):
    return retype(first(g, Op.TWIN_QUANT), twin=None)


@case("vit", "outside the twin's fine range")
def twin_quant_fine_codes_past_its_range(g):
    n = first(g, Op.TWIN_QUANT)
    bits, _, signed = n.out.twin
    return retype(n, twin=(bits, 0, signed))


@case("vit", "twin codes must be u8")
def twin_quant_codes_short_of_their_bits(g):
    return retype(first(g, Op.TWIN_QUANT), hi=254)


@case("vit", "small step's fractional length")
def twin_quant_changes_the_frac(g):
    n = first(g, Op.TWIN_QUANT)
    return retype(n, frac=int(n.out.frac) + 1)


@case("vit", "twin_expand reads twin codes")
def twin_expand_reads_plain_codes(g):
    n = first(g, Op.TWIN_EXPAND)
    n.inputs = g.node(n.inputs[0]).inputs
    return n.name


@case("vit", "expanded codes must be")
def twin_expand_range_not_the_fine_range(g):
    n = first(g, Op.TWIN_EXPAND)
    return retype(n, hi=n.out.hi - 1)


@case("vit", "small step's fractional length")
def twin_expand_changes_the_frac(g):
    n = first(g, Op.TWIN_EXPAND)
    return retype(n, frac=int(n.out.frac) + 1)


# const, expand_batch
@case("vit", "constant codes missing")
def const_without_codes(g):
    n = first(g, Op.CONST)
    del n.consts["codes"]
    return n.name


@case("vit", "batch dim of 1")
def const_with_a_batch_of_two(g):
    n = first(g, Op.CONST)
    n.consts["codes"] = np.concatenate([n.consts["codes"]] * 2)
    return retype(n, shape=(2,) + tuple(n.out.shape[1:]))


@case("vit", "constant codes outside")
def const_codes_outside_their_range(g):
    n = first(g, Op.CONST)
    return retype(n, hi=int(n.consts["codes"].max()) - 1)


@case("vit", "a constant takes no inputs")
def const_with_an_input(g):
    n = first(g, Op.CONST)
    n.inputs = [g.nodes[0].name]
    return n.name


@case("vit", "expand_batch repeats a batch-1 tensor")
def expand_batch_of_a_batched_tensor(g):
    n = first(g, Op.EXPAND_BATCH)
    n.inputs = n.inputs[::-1]
    return n.name


@case("vit", "expand_batch repeats a batch-1 tensor")
def expand_batch_without_the_batch_source(g):
    n = first(g, Op.EXPAND_BATCH)
    n.inputs = n.inputs[:1]
    return n.name


# gather, token_mask (text encoder)
@case("text", "gather reads integer token ids")
def gather_reads_codes(g):
    n = first(g, Op.GATHER)
    n.inputs = [first(g, Op.TOKEN_MASK).name]
    return n.name


@case("text", "[vocabulary, width]")
def gather_table_of_the_wrong_width(g):
    n = first(g, Op.GATHER)
    n.consts["table"] = n.consts["table"][:, :-1]
    return n.name


@case("text", "table codes outside")
def gather_table_codes_outside_the_range(g):
    n = first(g, Op.GATHER)
    return retype(n, hi=int(n.consts["table"].max()) - 1)


@case("text", "token_mask reads integer token ids")
def token_mask_reads_int32(g):
    g.input_type = replace(g.input_type, dtype="int32")
    return first(g, Op.TOKEN_MASK).name


@case("text", "unknown comparison")
def token_mask_unknown_comparison(g):
    n = first(g, Op.TOKEN_MASK)
    n.attrs = n.attrs.replace(compare="approx")
    return n.name


@case("text", "u8 0/1")
def token_mask_not_zero_one(g):
    return retype(first(g, Op.TOKEN_MASK), hi=2)


# ops that keep their input's format: each must share dtype, scale and zero point
SHARE = "must share dtype, scale and zero point"


@case("pointwise", SHARE)
def maxpool_changes_the_frac(g):
    n = first(g, Op.MAXPOOL_INT)
    return retype(n, frac=int(n.out.frac) + 1)


@case("pointwise", SHARE)
def concat_changes_the_frac(g):
    n = first(g, Op.CONCAT_INT)
    return retype(n, frac=int(n.out.frac) + 1)


@case("pointwise", SHARE)
def pad_changes_the_dtype(g):
    n = first(g, Op.PAD_INT)
    return retype(n, dtype="int16")


@case("pointwise", SHARE)
def clamp_changes_the_frac(g):
    n = first(g, Op.CLAMP_INT)
    return retype(n, frac=int(n.out.frac) + 1)


@case("cnn", SHARE)
def reshape_changes_the_frac(g):
    n = first(g, Op.RESHAPE)
    return retype(n, frac=int(n.out.frac) + 1)


@case("int8", SHARE)
def reshape_changes_the_zero_point(g):
    n = first(g, Op.RESHAPE)
    return retype(n, zp=n.out.zp + 1)


@case("int8", SHARE)
def reshape_changes_the_mantissa(g):
    n = first(g, Op.RESHAPE)
    return retype(n, mant=int(n.out.mant) + 1)


@case("vit", SHARE)
def permute_changes_the_frac(g):
    n = first(g, Op.PERMUTE)
    return retype(n, frac=int(n.out.frac) + 1)


@case("vit", SHARE)
def select_changes_the_frac(g):
    n = first(g, Op.SELECT)
    return retype(n, frac=int(n.out.frac) + 1)


@case("vit", SHARE)
def expand_batch_changes_the_frac(g):
    n = first(g, Op.EXPAND_BATCH)
    return retype(n, frac=int(n.out.frac) + 1)


@case("vit", "moves the batch axis")
def permute_moves_the_batch_axis(g):
    n = first(g, Op.PERMUTE)
    perm = list(n.attrs.perm)
    perm[0], perm[1] = perm[1], perm[0]
    n.attrs = n.attrs.replace(perm=tuple(perm))
    return n.name


@case("pointwise", "clamp bounds differ from the output range")
def clamp_bounds_not_the_output_range(g):
    n = first(g, Op.CLAMP_INT)
    n.attrs = n.attrs.replace(hi=n.attrs.hi - 1)
    return n.name


# Invariants the lowering keeps: a requant gives narrow codes; pass-through ops keep their input's range.
@case("cnn", "narrow")
def requant_to_int32_read_by_another_requant(g):
    rq = g.node(first(g, Op.DEQUANTIZE).inputs[0])
    narrow = rq.out
    rq.out = replace(narrow, dtype="int32", lo=-(2**31 - 1), hi=2**31 - 1)
    again = Node(rq.name + "_again", Op.REQUANT, [rq.name], narrow, {"shift": 0, "rounding": rq.attrs.rounding})
    g.nodes.insert(g.nodes.index(rq) + 1, again)
    first(g, Op.DEQUANTIZE).inputs = [again.name]
    return rq.name


@case("cnn", "range")
def reshape_declares_a_narrower_range_than_its_input(g):
    return retype(first(g, Op.RESHAPE), lo=0, hi=1)


@pytest.mark.parametrize("base, mutate, reason", CASES)
def test_rule(bases, base, mutate, reason):
    g = copy.deepcopy(bases[base])
    g.verify()                     # the unbroken copy is valid, so the error below is the mutation's
    name = mutate(g)
    with pytest.raises(VerifyError) as err:
        g.verify()
    msg = str(err.value)
    assert f"%{name}" in msg, f"the error does not name %{name}: {msg}"
    assert reason in msg, f"the error does not say {reason!r}: {msg}"


@pytest.mark.parametrize("base", ["cnn"] + sorted(BUILDERS))
def test_base_graph_verifies(bases, base):
    g = bases[base]
    g.verify()
    assert len(g.nodes) >= 3 and g.node(g.output).op is Op.DEQUANTIZE


# moved from tests/test_ir.py: the verifier's first tests, on the compiled residual model
def test_verifier_names_an_overflowing_node():
    """16-bit activations x 15-bit weights summed over 4096 inputs can exceed int32: compile must refuse."""
    import torch
    from torch import nn
    model = nn.Sequential(nn.Flatten(), nn.Linear(4096, 4)).eval()
    x = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(VerifyError, match=r"'%_1' \(linear_int\).*int32 max.*overflow"):
        fxq.compile(model, x, a_bits=16, w_bits=15, progress=False)


def test_verifier_rejects_overflow_with_message(qm):
    g = copy.deepcopy(qm.ir)
    fc = next(n for n in g.nodes if n.op is Op.LINEAR_INT)
    fc.consts["b"] = np.full_like(fc.consts["b"], 2**31 - 10)
    with pytest.raises(VerifyError, match=rf"%{fc.name}.*overflow|%{fc.name}.*bound"):
        g.verify()


def test_verifier_rejects_non_power_of_two_and_bad_shift(qm):
    g = copy.deepcopy(qm.ir)
    q = g.nodes[0]
    q.out = TensorType(q.out.dtype, q.out.shape, 3.5, q.out.lo, q.out.hi)
    with pytest.raises(VerifyError, match=rf"%{q.name}.*power of two"):
        g.verify()
    g = copy.deepcopy(qm.ir)
    rq = next(n for n in g.nodes if n.op is Op.REQUANT)
    rq.attrs = rq.attrs.replace(shift=tuple(s + 1 for s in np.atleast_1d(rq.attrs.shift)))
    with pytest.raises(VerifyError, match=rf"%{rq.name}.*shift"):
        g.verify()
