"""The op table (fxq.ops): every op's four spellings agree on models that use it.

For each case, every node the lowering emits passes its verifier rule, prints one line, and its
reference kernel and its ONNX form give the same codes, tensor by tensor (ONNX Runtime with every
integer tensor as an extra output). The last test fails when an op in the table has no case here.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fxq
from conftest import tiny
from fxq.backends import onnx_qdq, reference
from fxq.ir import Graph
from fxq.ops import OPS, Op, spec
from fxq.zoo.text import TextEncoder, random_sentences
from fxq.zoo.vit import ViT


def _seeded(cls, **kw):
    torch.manual_seed(0)
    return cls(**kw).eval()


def _vit():
    return _seeded(ViT, dim=16, depth=1, heads=2, mlp_ratio=2, patch=7)


def _images(n=16):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(3))


class _PoolThenClamp(torch.nn.Module):
    """A ReLU6 after a max pool (a standalone clamp_int) and a linear layer between two others (clustered
    on dfp-cluster, whose first and last layers keep 8-bit weights)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(4 * 13 * 13, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                       torch.nn.ReLU(), torch.nn.Linear(32, 10))

    def forward(self, x):
        x = torch.nn.functional.relu6(torch.nn.functional.max_pool2d(self.conv(x), 2))
        return self.mlp(torch.flatten(x, 1))


def _text():
    return _seeded(TextEncoder)


# name -> (model, calibration/test input, compile options)
CASES = {
    "residual shift-int": (lambda: tiny("residual"), _images, {}),
    "concat fixed-point8": (lambda: tiny("concat"), _images, {"target": "fixed-point8"}),
    "inverted residual int8": (lambda: tiny("inverted_residual"), _images, {"target": "int8"}),
    "pools and pads shift-int": (lambda: tiny("pools_and_pads"), _images, {}),
    "residual dfp-cluster": (lambda: tiny("residual"), _images, {"target": "dfp-cluster"}),
    "pool, clamp, mlp dfp-cluster": (lambda: _seeded(_PoolThenClamp), _images, {"target": "dfp-cluster"}),
    "vit integer-only": (_vit, _images, {}),
    "vit float islands": (_vit, _images, {"float_islands": "all"}),
    "text encoder integer-only": (_text, lambda: random_sentences(16, seed=1), {}),
    "text encoder float islands": (_text, lambda: random_sentences(16, seed=1), {"float_islands": "all"}),
}


@pytest.fixture(scope="module")
def compiled():
    out = {}
    for name, (model, data, kw) in CASES.items():
        kw = dict(kw)
        target = kw.pop("target", "shift-int")
        x = data()
        out[name] = (fxq.compile(model(), x, target, progress=False, **kw), x)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_and_onnx_agree_on_every_tensor(compiled, case):
    qm, x = compiled[case]
    ref = reference.execute(qm.ir, x.numpy(), keep=True)
    ort = onnx_qdq.debug_codes(qm.ir, x.numpy())
    assert len(ort) >= len(qm.ir.nodes) // 2, "too few integer tensors exported as outputs to compare"
    for name, codes in ort.items():
        op = qm.ir.node(name).op.value
        bad = np.argwhere(codes != ref[name])
        assert bad.size == 0, f"%{name} ({op}): ONNX Runtime differs from the reference at {len(bad)} positions"


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_node_prints_one_line_and_round_trips(compiled, case, tmp_path):
    qm, _ = compiled[case]
    lines = str(qm.ir).splitlines()[1:]
    assert len(lines) == len(qm.ir.nodes)
    for line, n in zip(lines, qm.ir.nodes):
        assert line.startswith(f"%{n.name} ") and f"= {n.op.value}(" in line, line
    qm.ir.save(tmp_path / "m.fxq")
    back = Graph.load(tmp_path / "m.fxq")
    assert str(back) == str(qm.ir)
    assert [n.attrs for n in back.nodes] == [n.attrs for n in qm.ir.nodes]
    assert [n.src for n in back.nodes] == [n.src for n in qm.ir.nodes]


def test_every_op_in_the_table_has_a_case(compiled):
    used = {n.op for qm, _ in compiled.values() for n in qm.ir.nodes}
    missing = sorted(op.value for op in OPS if op not in used)
    assert not missing, f"ops with no case in tests/test_ops.py: {missing}"


def test_an_unknown_op_or_attribute_names_the_node():
    with pytest.raises(KeyError, match="unknown IR op 'conv3d_int'.*conv2d_int"):
        spec("conv3d_int")
    qm = fxq.compile(tiny("residual"), _images(8), progress=False)
    rq = next(n for n in qm.ir.nodes if n.op is Op.REQUANT)
    from fxq.errors import VerifyError
    from fxq.ir import Node
    with pytest.raises(VerifyError, match=rf"%{rq.name}.*unknown attribute\(s\) \['shfit'\]"):
        Node(rq.name, rq.op, rq.inputs, rq.out, {"shfit": 3, "rounding": "half_even"})
    with pytest.raises(VerifyError, match=rf"%{rq.name}.*missing attribute\(s\) \['shift'\]"):
        Node(rq.name, rq.op, rq.inputs, rq.out, {"rounding": "half_even"})


def test_the_op_table_in_the_docs_is_generated_from_the_code():
    import subprocess
    import sys
    from pathlib import Path
    tool = Path(__file__).resolve().parent.parent / "tools" / "doc_ops.py"
    done = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_fxq_ops_lists_every_op_with_its_attributes():
    from click.testing import CliRunner
    from fxq.cli import main
    out = CliRunner().invoke(main, ["ops"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()[2:]
    assert [ln.split()[0] for ln in lines] == [op.value for op in OPS]
    requant = next(ln for ln in lines if ln.startswith("requant "))
    assert "shift, rounding, multiplier=None" in requant and "requantizing" in requant
