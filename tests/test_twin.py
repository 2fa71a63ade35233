"""Twin-uniform codes (PTQ4ViT): round trips at the range boundaries, the format search, the IR ops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fxq
from fxq.formats import Twin, fake_twin, twin_compress, twin_expand, twin_gelu_frac, twin_max_shift
from fxq.ir import Op
from fxq.zoo.vit import ViT


def _cases():
    for bits in (4, 6, 8):
        for signed in (False, True):
            for m in sorted({0, 1, twin_max_shift(bits) // 2, twin_max_shift(bits)}):
                yield Twin(bits, m, signed)


@pytest.mark.parametrize("t", list(_cases()), ids=str)
def test_round_trip_over_every_fine_code_and_past_both_edges(t):
    r = t.fine_range
    fine = np.arange(r.lo - 50, r.hi + 50 * 2 ** t.shift)
    codes = twin_compress(fine, t)
    assert codes.min() >= 0 and codes.max() <= 2 ** t.bits - 1, "a twin code overflowed its bits"
    back = twin_expand(codes, t)
    inside = (fine >= r.lo) & (fine <= r.hi)
    r1 = inside & ((fine < 0) if t.signed else (fine < t.half))
    assert np.array_equal(back[r1], fine[r1]), "R1 codes are exact"
    assert np.abs(back[inside] - fine[inside]).max() <= 2 ** max(t.shift - 1, 0), "R2 rounds to its step"
    assert back[fine > r.hi].min() == back[fine > r.hi].max() == r.hi, "saturates at R2's top, code 2**bits - 1"
    if t.shift or t.signed:                     # m = 0 post-softmax: every code is in R1
        assert twin_compress(np.array([r.hi]), t)[0] == 2 ** t.bits - 1
    assert np.all(np.diff(back) >= 0), "monotonic"
    assert np.array_equal(twin_compress(torch.from_numpy(fine), t, torch).numpy(), codes)
    assert np.array_equal(twin_expand(torch.from_numpy(codes), t, torch).numpy(), back)


def test_fake_twin_holds_the_values_of_the_codes():
    t = Twin(8, 4, False)
    x = torch.rand(10000, dtype=torch.float64) ** 4            # softmax-like: mostly small
    frac = 7 + t.shift
    fine = torch.round(x * 2.0 ** frac).clamp(t.fine_range.lo, t.fine_range.hi).long()
    want = twin_expand(twin_compress(fine, t, torch), t, torch).double() * 2.0 ** -frac
    assert torch.equal(fake_twin(x, frac, t), want)
    # small values keep R1's step 2**-11, large ones R2's 2**-7
    small = x < 127 * 2.0 ** -frac
    assert (fake_twin(x, frac, t) - x)[small].abs().max() <= 2.0 ** -(frac + 1)


def test_twin_beats_one_uniform_step_on_post_softmax_values():
    from fxq.formats import IntRange, fake_quant
    x = torch.softmax(torch.randn(2000, 50, dtype=torch.float64) * 3, dim=-1).reshape(-1)
    uniform = fake_quant(x, 8, IntRange(0, 255))
    best = min(float(((fake_twin(x, 7 + m, Twin(8, m, False)) - x) ** 2).sum()) for m in range(8))
    assert best < 0.5 * float(((uniform - x) ** 2).sum())


def test_gelu_r1_reaches_gelu_minimum():
    for bits in (4, 6, 8):
        f = twin_gelu_frac(bits)
        assert (2 ** (bits - 1) - 1) * 2.0 ** -f >= 0.16997 > (2 ** (bits - 1) - 1) * 2.0 ** -(f + 1)


def _vit():
    torch.manual_seed(3)
    return ViT(dim=16, depth=1, heads=2, mlp_ratio=2, patch=7).eval()


@pytest.mark.parametrize("islands", [(), "all"])
def test_vit_twin_codes_in_the_ir_and_exact(islands, tmp_path):
    from fxq.backends import onnx_qdq
    qm = fxq.compile(_vit(), torch.randn(32, 1, 28, 28), float_islands=islands, search="hessian", progress=False)
    twins = [n for n in qm.ir.nodes if n.op is Op.TWIN_QUANT]
    assert len(twins) == 2 and {n.out.twin[2] for n in twins} == {False, True}      # softmax and GELU
    assert all(n.out.dtype == "uint8" for n in twins)
    x = torch.randn(6, 1, 28, 28)
    ref = qm.run_codes(x.numpy())
    qm.export_onnx(tmp_path / "t.onnx")
    assert np.array_equal(qm.fake_codes(x), ref)
    assert np.array_equal(onnx_qdq.run_codes(qm.ir, tmp_path / "t.onnx", x.numpy()), ref)
    qm.save(tmp_path / "t.fxq")
    again = fxq.load(tmp_path / "t.fxq")
    assert [n.out for n in again.ir.nodes] == [n.out for n in qm.ir.nodes]
    assert np.array_equal(again.run_codes(x.numpy()), ref)


def test_twin_uniform_off_and_on_dyadic_targets():
    qm = fxq.compile(_vit(), torch.randn(16, 1, 28, 28), twin_uniform=(), progress=False)
    assert not any(n.op is Op.TWIN_QUANT for n in qm.ir.nodes)
    with pytest.raises(fxq.TargetError, match="twin_uniform needs power-of-two steps"):
        fxq.get_target("int8", twin_uniform="softmax")
    with pytest.raises(fxq.TargetError, match="unknown ops"):
        fxq.get_target("shift-int", twin_uniform={"relu"})
