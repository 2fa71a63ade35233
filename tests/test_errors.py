"""Bad input gets an error that names what was wrong; nothing silently produces a wrong model."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from conftest import tiny
from fxq.errors import CalibrationError, InputError, TraceFailure, UnsupportedOp

X = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:                      # data-dependent control flow
            return x
        return -x


def test_data_dependent_control_flow_names_module_and_line():
    with pytest.raises(TraceFailure) as err:
        fxq.compile(DataDependent().eval(), X, progress=False)
    msg = str(err.value)
    assert "module 'gate' (Gate)" in msg
    assert "test_errors.py" in msg and "if x.sum() > 0" in msg
    assert "hint:" in msg and "torch.where" in msg


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


def test_unsupported_op_names_node_op_and_source_line():
    with pytest.raises(UnsupportedOp) as err:
        fxq.compile(Unsupported().eval(), X, progress=False)
    msg = str(err.value)
    assert "node 'sigmoid'" in msg and "torch.sigmoid" in msg.replace("torch._C._VariableFunctions", "torch")
    assert "test_errors.py" in msg and "return torch.sigmoid(self.conv(x))" in msg
    assert "fxq lowers:" in msg


def test_unsupported_module_type():
    with pytest.raises(UnsupportedOp, match=r"module type SiLU"):
        fxq.compile(nn.Sequential(nn.Conv2d(1, 2, 3), nn.SiLU()).eval(), X, progress=False)


def test_integer_nonlinearity_on_a_dyadic_target_names_the_option():
    with pytest.raises(UnsupportedOp, match=r"node 'gelu'.*integer gelu needs power-of-two formats.*float_islands"):
        fxq.compile(nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU()).eval(), X, "int8", float_islands=(), progress=False)


def test_training_mode_model_is_compiled_in_eval_mode_with_a_warning():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(0.5))
    m.train()
    with pytest.warns(UserWarning, match="training mode"):
        qm = fxq.compile(m, X, progress=False)
    assert any("training mode" in n for n in qm.notes)
    assert m.training, "the user's model keeps its mode"


def test_non_power_of_two_pool_without_consumer_is_refused():
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3)).eval()
    with pytest.raises(UnsupportedOp, match=r"3x3=9.*not a power of two"):
        fxq.compile(m, X, progress=False)


@pytest.mark.parametrize("empty", [[], torch.zeros(0, 1, 28, 28)])
def test_empty_calibration_data(empty):
    with pytest.raises(CalibrationError, match="empty"):
        fxq.compile(tiny("residual"), empty, progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_in_calibration_data(bad):
    x = X.clone()
    x[3, 0, 5, 5] = bad
    with pytest.raises(CalibrationError, match=r"batch 0 contains 1 NaN/inf"):
        fxq.compile(tiny("residual"), [x], progress=False)


def test_calibration_batch_of_wrong_shape():
    with pytest.raises(CalibrationError, match=r"batch 1 has shape \(4, 3, 28, 28\)"):
        fxq.compile(tiny("residual"), [X, torch.zeros(4, 3, 28, 28)], progress=False)


def test_wrong_input_shape_at_run_time():
    qm = fxq.compile(tiny("residual"), X, progress=False)
    with pytest.raises(InputError, match=r"shape \[2, 1, 32, 32\]; this model takes \[N, 1, 28, 28\]"):
        qm.run(np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(InputError, match=r"shape \[2, 28, 28\]"):
        qm(torch.zeros(2, 28, 28))
    with pytest.raises(InputError, match="dtype int64"):
        qm.run(np.zeros((2, 1, 28, 28), np.int64))


def test_data_free_needs_an_input_description():
    with pytest.raises(CalibrationError, match="example_input= or input_shape="):
        fxq.compile(tiny("residual"), None, progress=False)


def test_unknown_target_and_override():
    with pytest.raises(fxq.TargetError, match="unknown target 'nope'"):
        fxq.compile(tiny("residual"), X, target="nope", progress=False)
    with pytest.raises(fxq.TargetError, match=r"unknown target override\(s\) \['w_bitz'\]"):
        fxq.compile(tiny("residual"), X, w_bitz=4, progress=False)
    with pytest.raises(fxq.TargetError, match="w_bits=1"):
        fxq.compile(tiny("residual"), X, w_bits=1, progress=False)


def test_user_model_is_not_modified():
    m = tiny("pools_and_pads")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fxq.compile(m, X, progress=False)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_relu6_standalone_after_add_is_exact():
    """A ReLU6 that is not fused into a producer clamps codes on the input's grid."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 2, 3, padding=1)
            self.fc = nn.Linear(2 * 14 * 14, 3)

        def forward(self, x):
            y = self.a(x)
            z = F.max_pool2d(y, 2)
            return self.fc(torch.flatten(F.relu6(z), 1))
    from conftest import assert_three_executors
    qm = fxq.compile(M().eval(), X * 4, progress=False)
    assert any(n.op.value == "clamp_int" for n in qm.ir.nodes)
    assert_three_executors(qm, X * 4)


class SharedLayer(nn.Module):
    """One conv called twice: one weight format cannot serve two inputs of different formats (canonicalize
    refuses it; before, the compile failed inside bias_correction)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.b(torch.clamp(self.a(x), 0, 6))
        return self.fc(self.b(torch.relu(y)).mean((2, 3)))


def test_a_layer_called_twice_is_refused_by_name():
    with pytest.raises(UnsupportedOp, match=r"module 'b' is called 2 times \(nodes b, b_1\).*copy.deepcopy"):
        fxq.compile(SharedLayer().eval(), X, "shift-int", progress=False)
