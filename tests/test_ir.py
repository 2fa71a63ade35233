"""The integer IR: printing, power-of-two scales, and save/load without pickle (the verifier: test_verify.py)."""
import zipfile

import numpy as np
import pytest

import fxq
from conftest import tiny
from fxq.errors import LoadError
from fxq.ir import Op


@pytest.fixture(scope="module")
def qm():
    import torch
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return fxq.compile(tiny("residual"), x, progress=False)


def test_print_one_line_per_node(qm):
    text = str(qm.ir)
    lines = text.splitlines()
    assert len(lines) == len(qm.ir.nodes) + 1
    assert lines[1].startswith("%x_q") and "quantize(x:f32[N,1,28,28]" in lines[1] and "f=" in lines[1]
    assert any("conv2d_int(" in ln and "w:i8[" in ln and "-> i32[N," in ln for ln in lines)
    assert any("requant(" in ln and ">>" in ln and "half_even" in ln and "clamp[0,255]" in ln for ln in lines)
    assert lines[-1].startswith("%output") and "dequantize" in lines[-1]


def test_every_scale_is_a_power_of_two_and_every_requant_a_shift(qm):
    for n in qm.ir.nodes:
        fracs = n.out.frac if isinstance(n.out.frac, tuple) else (n.out.frac,)
        assert n.out.dtype == "float32" or all(isinstance(f, int) for f in fracs), n.name
        if n.op in (Op.REQUANT, Op.ADD_INT, Op.AVGPOOL_INT):
            assert np.issubdtype(np.asarray(n.attrs.shift).dtype, np.integer)
    ops = {n.op for n in qm.ir.nodes}
    assert ops <= set(Op) and not any("mul" in o.value for o in ops)


def test_save_load_run_identical(qm, tmp_path):
    import torch
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "m.fxq"
    qm.save(path)
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["consts.npz", "ir.json", "notes.json"]
    loaded = fxq.load(path)
    assert str(loaded.ir) == str(qm.ir)
    np.testing.assert_array_equal(loaded.run_codes(x), qm.run_codes(x))
    np.testing.assert_array_equal(loaded.run(x), qm.run(x))
    np.testing.assert_array_equal(loaded(x).numpy(), qm.run(x).astype(np.float32))


def test_load_never_unpickles(qm, tmp_path, monkeypatch):
    path = tmp_path / "m.fxq"
    qm.save(path)
    import pickle
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    fxq.load(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "wrong_json", "missing_const"])
def test_corrupt_saved_file(qm, tmp_path, damage):
    path = tmp_path / "m.fxq"
    qm.save(path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a zip" * 50)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with zipfile.ZipFile(path) as z:
            parts = {n: z.read(n) for n in z.namelist()}
        if damage == "wrong_json":
            parts["ir.json"] = b'{"format": "something-else"}'
        else:
            import io
            buf = io.BytesIO()
            np.savez(buf, nothing=np.zeros(1))
            parts["consts.npz"] = buf.getvalue()
        with zipfile.ZipFile(path, "w") as z:
            for n, b in parts.items():
                z.writestr(n, b)
    with pytest.raises(LoadError, match=str(path.name)):
        fxq.load(path)


def test_networkx_view_is_a_dag(qm):
    import networkx as nx
    g = qm.ir.to_networkx()
    assert nx.is_directed_acyclic_graph(g)
    assert list(nx.topological_sort(g))[0] == qm.ir.input_name
