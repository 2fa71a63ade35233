"""Transformers: attention capture, matmul of two activations, float islands, constants, exactness."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq import islands
from fxq.backends import onnx_qdq
from fxq.errors import UnsupportedOp
from fxq.ir import Op
from fxq.zoo.vit import ViT

torch.manual_seed(0)
T, E, H = 6, 16, 4


def _tiny_vit():
    torch.manual_seed(1)
    return ViT(dim=16, depth=1, heads=2, mlp_ratio=2, patch=7).eval()


def _three_way(qm, x: torch.Tensor, tmp_path) -> tuple[float, float]:
    """(fake-quant == reference, ONNX Runtime == reference) code agreement."""
    ref = qm.run_codes(x.numpy())
    path = tmp_path / "m.onnx"
    qm.export_onnx(path)
    ort = onnx_qdq.run_codes(qm.ir, path, x.numpy())
    return float((qm.fake_codes(x) == ref).mean()), float((ort == ref).mean())


@pytest.mark.parametrize("target", ["shift-int", "fixed-point8", "int8"])
def test_vit_with_float_islands_is_three_executor_exact(target, tmp_path):
    m = _tiny_vit()
    qm = fxq.compile(m, torch.randn(32, 1, 28, 28), target, float_islands="all", progress=False)
    x = torch.randn(8, 1, 28, 28)
    assert _three_way(qm, x, tmp_path) == (1.0, 1.0)
    ops = [n.op for n in qm.ir.nodes]
    assert ops.count(Op.FLOAT_ISLAND) == 2 + 1 + 1 + 1          # 3 LayerNorms, softmax, GELU
    assert ops.count(Op.MATMUL_INT) == 2 and ops.count(Op.CONST) == 2 and Op.EXPAND_BATCH in ops
    assert qm.report().summary["float islands"] == "5 (1 gelu, 3 layer_norm, 1 softmax)"


@pytest.mark.parametrize("target", ["shift-int", "fixed-point8"])
def test_vit_integer_only_has_no_float_island_and_is_three_executor_exact(target, tmp_path):
    m = _tiny_vit()
    qm = fxq.compile(m, torch.randn(32, 1, 28, 28), target, progress=False)
    assert _three_way(qm, torch.randn(8, 1, 28, 28), tmp_path) == (1.0, 1.0)
    ops = [n.op for n in qm.ir.nodes]
    assert Op.FLOAT_ISLAND not in ops and qm.report().summary["float islands"] == 0
    assert (ops.count(Op.LAYERNORM_INT), ops.count(Op.SOFTMAX_INT), ops.count(Op.GELU_INT)) == (3, 1, 1)
    assert all(n.out.dtype != "float32" for n in qm.ir.nodes[:-1])


@pytest.mark.parametrize("kw", [{"search": "hessian"}, {"reconstruct": {"iters": 20}}])
def test_integer_kernels_follow_formats_that_calibration_passes_move(kw, tmp_path):
    """hessian_search and reconstruct change steps after the kernels are built: they must follow."""
    m = _tiny_vit()
    qm = fxq.compile(m, torch.randn(32, 1, 28, 28), progress=False, **kw)
    assert _three_way(qm, torch.randn(4, 1, 28, 28), tmp_path) == (1.0, 1.0)


def test_int8_target_keeps_nonlinearities_in_float_like_onnx_runtime():
    qm = fxq.compile(_tiny_vit(), torch.randn(16, 1, 28, 28), "int8", progress=False)
    assert qm.report().summary["float islands"] == "5 (1 gelu, 3 layer_norm, 1 softmax)"


class _Explicit(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.q, self.k, self.v, self.o = (nn.Linear(8, E), nn.Linear(E, E), nn.Linear(E, E),
                                                    nn.Linear(E, E), nn.Linear(E, 4))

    def heads(self, y):
        n, t, _ = y.shape
        return y.reshape(n, t, H, E // H).transpose(1, 2)

    def attend(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / (E // H) ** 0.5, dim=-1) @ v

    def forward(self, x):
        h = self.emb(x)
        n, t, _ = h.shape
        a = self.attend(self.heads(self.q(h)), self.heads(self.k(h)), self.heads(self.v(h)))
        return self.o(a.transpose(1, 2).reshape(n, t, E))


class _Sdpa(_Explicit):
    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class _Mha(nn.Module):
    def __init__(self, src: _Explicit):
        super().__init__()
        self.emb, self.o = src.emb, src.o
        self.mha = nn.MultiheadAttention(E, H, batch_first=True)
        with torch.no_grad():
            self.mha.in_proj_weight.copy_(torch.cat([src.q.weight, src.k.weight, src.v.weight]))
            self.mha.in_proj_bias.copy_(torch.cat([src.q.bias, src.k.bias, src.v.bias]))
            self.mha.out_proj.weight.copy_(torch.eye(E))
            self.mha.out_proj.bias.zero_()

    def forward(self, x):
        h = self.emb(x)
        return self.o(self.mha(h, h, h, need_weights=False)[0])


def test_three_attention_spellings_lower_to_one_form(tmp_path):
    explicit = _Explicit().eval()
    sdpa = _Sdpa().eval()
    sdpa.load_state_dict(explicit.state_dict())
    mha = _Mha(explicit).eval()
    calib, x = torch.randn(32, T, 8), torch.randn(5, T, 8)
    irs = {}
    for name, m in (("explicit", explicit), ("sdpa", sdpa), ("mha", mha)):
        qm = fxq.compile(m, calib, progress=False)
        assert _three_way(qm, x, tmp_path) == (1.0, 1.0), name
        irs[name] = [n.op for n in qm.ir.nodes]
    core = lambda ops: [o for o in ops if o in (Op.MATMUL_INT, Op.SOFTMAX_INT, Op.PERMUTE)]  # noqa: E731
    assert core(irs["explicit"]) == core(irs["sdpa"])
    # MHA adds its out_proj (identity weights here) but attends the same way
    assert core(irs["mha"]) == core(irs["explicit"])


@pytest.mark.parametrize("islands_opt", ["softmax", ()])
def test_causal_mask_becomes_part_of_the_softmax(islands_opt, tmp_path):
    class Causal(_Explicit):
        def attend(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    m = Causal().eval()
    qm = fxq.compile(m, torch.randn(32, T, 8), float_islands=islands_opt, progress=False)
    (softmax,) = [n for n in qm.ir.nodes if n.op in (Op.FLOAT_ISLAND, Op.SOFTMAX_INT)]
    assert softmax.consts["mask"].shape == (1, 1, T, T)
    # float: the mask itself; integer: mask codes saturated at int16's minimum
    assert softmax.consts["mask"].min() <= (-1e3 if islands_opt else -32768)
    assert not any(n.op is Op.ADD_INT for n in qm.ir.nodes), "the mask is not quantized as an add"
    assert _three_way(qm, torch.randn(4, T, 8), tmp_path) == (1.0, 1.0)
    # the quantized attention stays causal: the first token's output ignores later tokens
    x = torch.randn(1, T, 8)
    y = x.clone()
    y[:, 1:] += 3.0
    assert torch.equal(qm(x)[:, 0], qm(y)[:, 0])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_island_formula_matches_torch_and_numpy(approximate):
    x = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    ours = islands.gelu(x, approximate)
    # A&S 7.1.26 bounds |erf error| by 1.5e-7, so GELU's error is below 0.5 * |x| * 1.5e-7
    exact = F.gelu(x, approximate=approximate)
    assert float(((ours - exact).abs() / x.abs().clamp(min=1)).max()) < 1e-7
    # numpy's and torch's exp/tanh may differ in the last bits of a float64 (absolute, where 1 + tanh cancels)
    np.testing.assert_allclose(islands.gelu_np(x.numpy(), approximate), ours.numpy(), rtol=1e-14, atol=1e-15)


def test_softmax_and_layer_norm_islands_agree_with_numpy():
    x = torch.randn(4, 7, 33, dtype=torch.float64)
    np.testing.assert_allclose(islands.softmax_np(x.numpy()), islands.softmax(x).numpy(), rtol=1e-14, atol=1e-16)
    ln = islands.LayerNorm.of(nn.LayerNorm(33)).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
        got = ln(x).numpy()
    want = islands.layer_norm_np(x.numpy(), ln.weight.detach().numpy(), ln.bias.detach().numpy(), ln.eps)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


class _Net(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.lin = nn.Linear(8, E)
        self.body = body

    def forward(self, x):
        return self.body(self.lin(x))


@pytest.mark.parametrize("body, match", [
    (lambda h: torch.softmax(h, dim=1), r"softmax over dim 1; fxq lowers softmax over the last dim only"),
    (lambda h: h.transpose(0, 1), r"moves the batch dimension"),
    (lambda h: h * h, r"multiplication of two tensors"),
    (lambda h: h[0], r"one integer index, not on the batch dim"),
    (lambda h: torch.relu(h) * 0.5, r"factor 0.5 has no conv/linear above it"),
])
def test_transformer_ops_refused_with_the_reason(body, match):
    class M(_Net):
        def forward(self, x):
            return body(self.lin(x))

    with pytest.raises(UnsupportedOp, match=match):
        fxq.compile(M(None).eval(), torch.randn(8, T, 8), float_islands="all", progress=False)


def test_parameter_without_batch_dim_is_refused_with_a_hint():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, E)
            self.pos = nn.Parameter(torch.randn(T, E))

        def forward(self, x):
            return self.lin(x) + self.pos

    with pytest.raises(UnsupportedOp, match=r"parameter/buffer 'pos' of shape \[6, 16\].*leading batch dim of 1"):
        fxq.compile(M().eval(), torch.randn(8, T, 8), progress=False)


def test_float_islands_option_accepts_names_and_rejects_unknown_ones():
    assert fxq.get_target("shift-int", float_islands="softmax, gelu").float_islands == {"softmax", "gelu"}
    assert fxq.get_target("shift-int", float_islands="all").float_islands == set(islands.ISLAND_FUNCTIONS)
    with pytest.raises(fxq.TargetError, match="unknown ops"):
        fxq.get_target("shift-int", float_islands={"sigmoid"})


def test_trained_vit_w8a8_with_float_islands_on_real_images():
    """The bundled ViT (tools/train_zoo.py) at W8A8 shift-int with float islands: three executors agree
    on real test images and top-1 decisions stay those of the FP32 model."""
    from conftest import assert_three_executors
    from fxq import data, zoo

    x, _ = data.load_test_subset()
    model = zoo.load("vit")
    qm = fxq.compile(model, x[:128], float_islands="all", progress=False)
    assert_three_executors(qm, x[128:192])
    with torch.no_grad():
        fp32 = model(x[128:]).argmax(1).numpy()
    assert 100 * float((qm.run(x[128:]).argmax(1) == fp32).mean()) >= 98.0
