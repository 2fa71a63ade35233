"""Fast checks of the benchmark baselines (tools/baselines.py) on a tiny random CNN."""

import copy
import os
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import baselines as B  # noqa: E402


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(y + self.bn2(self.conv2(y)))
        return self.fc(torch.flatten(self.pool(y), 1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():  # non-trivial BN statistics so folding matters
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    model.eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 1, 28, 28, generator=g) for _ in range(4)]
    test = torch.randn(64, 1, 28, 28, generator=g)
    with torch.no_grad():
        ref = model(test).numpy()
    fp32 = B.export_fp32_onnx(model, test[:2], tmp_path_factory.mktemp("onnx") / "fp32.onnx")
    return model, calib, test, ref, fp32


def _check_close(out, ref, max_rel=0.1, min_agree=0.8):
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    agree = (out.argmax(1) == ref.argmax(1)).mean()
    assert rel < max_rel and agree >= min_agree, (rel, agree)


def test_fp32_export_matches_torch(setup):
    model, _, test, ref, fp32 = setup
    m = onnx.load(fp32)
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["logits"]
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    sess = B.ort_session(fp32)
    np.testing.assert_allclose(B.ort_fn(sess)(test), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(B.ort_fn(sess)(test[:3]), ref[:3], atol=1e-4, rtol=0)  # dynamic batch


@pytest.mark.parametrize("name", sorted(B.torch_ao_fx_configs()))
def test_torch_ao_fx_int8_close_to_fp32(setup, name):
    model, calib, test, ref, _ = setup
    before = copy.deepcopy(model.state_dict())
    engine = torch.backends.quantized.engine
    q = B.torch_ao_fx_int8(model, calib, test[:2], **B.torch_ao_fx_configs()[name])
    assert torch.backends.quantized.engine == engine  # global engine restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert isinstance(model.conv1, nn.Conv2d) and type(model.conv1) is nn.Conv2d
    _check_close(B.torch_fn(q)(test), ref)


def test_qnnpack_relu6_workaround():
    """qnnpack's quantized ReLU6 is wrong on channels_last input; run_engine="x86" avoids it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).numpy()
    q = B.torch_ao_fx_int8(model, [x], x[:2], **B.torch_ao_fx_configs()["qnnpack_per_tensor_x86_run"])
    assert q.qengine == "x86"
    _check_close(B.torch_fn(q)(x), ref, max_rel=0.05)  # the bug gives ~0.2 here


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(activation_type="uint8", calibrate_method="MinMax", reduce_range=True),
        dict(activation_type="uint8", calibrate_method="MinMax", reduce_range=False),
        dict(activation_type="int8", calibrate_method="Percentile"),
        dict(activation_type="uint8", calibrate_method="Entropy", entropy_num_bins=256),
    ],
    ids=lambda k: "-".join(str(v) for v in k.values()),
)
def test_ort_quantize_static_close_to_fp32(setup, tmp_path, kwargs):
    _, calib, test, _, fp32 = setup
    ref = B.ort_fn(B.ort_session(fp32))(test)
    q = B.ort_quantize_static(fp32, tmp_path / "q.onnx", calib, **kwargs)
    ops = {n.op_type for n in onnx.load(q).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    _check_close(B.ort_fn(B.ort_float_emulated_session(q))(test), ref, max_rel=0.05)
    _check_close(B.ort_fn(B.ort_session(q))(test), ref)  # integer kernels may saturate: looser


def _activation_scales(path):
    m = onnx.load(path)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    return {n.input[0]: float(init[n.input[1]]) for n in m.graph.node if n.op_type == "QuantizeLinear"}


def test_ort_entropy_is_not_minmax(setup, tmp_path):
    """Guards the workaround: ORT's default Entropy settings reproduce MinMax ranges."""
    _, calib, _, _, fp32 = setup
    mm = B.ort_quantize_static(fp32, tmp_path / "mm.onnx", calib, calibrate_method="MinMax")
    ent = B.ort_quantize_static(
        fp32, tmp_path / "ent.onnx", calib, calibrate_method="Entropy", entropy_num_bins=256
    )
    a, b = _activation_scales(mm), _activation_scales(ent)
    assert a.keys() == b.keys()
    assert any(not np.isclose(a[k], b[k]) for k in a)


def test_ort_quantize_survives_preprocess_failure(setup, tmp_path, monkeypatch):
    import onnxruntime.quantization.shape_inference as si

    def boom(*args, **kwargs):
        raise RuntimeError("simulated pre-processing failure")

    monkeypatch.setattr(si, "quant_pre_process", boom)
    _, calib, test, ref, fp32 = setup
    q = B.ort_quantize_static(fp32, tmp_path / "q.onnx", calib, reduce_range=True)
    _check_close(B.ort_fn(B.ort_session(q))(test), ref)


def test_configs_cover_grid():
    ort = B.ort_configs()
    grid = {(c["activation_type"], c["calibrate_method"], c["reduce_range"]) for c in ort.values()}
    assert len(ort) == len(grid) == 12
    assert {"u8-MinMax", "s8-MinMax"} <= ort.keys()  # names tools/bench.py uses
    assert {"x86", "qnnpack"} <= {c["backend"] for c in B.torch_ao_fx_configs().values()}


def test_accuracy_and_latency_helpers(setup):
    model, _, test, ref, fp32 = setup
    labels = ref.argmax(1)
    assert B.accuracy_torch(model, test, labels, batch_size=20) == 100.0
    assert B.accuracy_ort(B.ort_session(fp32), test.numpy(), labels, batch_size=20) == 100.0
    wrong = (labels + 1) % 10
    assert B.accuracy_ort(B.ort_session(fp32), test, wrong) == 0.0
    ms = B.latency_ms(B.ort_fn(B.ort_session(fp32)), test[:8], warmup=1, repeats=3)
    assert ms > 0
