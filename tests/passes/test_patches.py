"""fxq.passes.calibration.patches: the crops reconstruct trains convolutional blocks on give the whole-map output exactly."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxq
from conftest import assert_three_executors, randomize_bn, tiny
from fxq.passes.calibration.blocks import block_graph, split_blocks
from fxq.context import ReconstructOptions
from fxq.errors import CalibrationError
from fxq.fakequant import set_quantization
from fxq.passes.calibration.patches import crop_batch, crop_output, plan_patches, receptive_field, sample_window, window
from test_reconstruct import X, block_input, fake_model


class Local(nn.Module):
    """Every way a block moves pixels: an asymmetric pad before a stride-2 conv, a dilated conv, a
    depthwise 5x5 inside a residual block, ReLU6 clamps; then a pool and a classifier."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(1, c, 3, 2, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU6())
        self.dilated = nn.Sequential(nn.Conv2d(c, c, 3, 1, 2, dilation=2, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 5, 1, 2, groups=2 * c, bias=False), nn.BatchNorm2d(2 * c),
                                nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.dilated(self.stem(x))
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(x.mean((2, 3)))


def local(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(Local(), seed)


def _spatial_blocks(gm):
    fields = [(b, receptive_field(gm, b)) for b in split_blocks(gm)]
    return [(b, f) for b, f in fields if f is not None]


def test_the_field_is_each_output_pixels_exact_input_range():
    """Where the gradient of one output pixel is non-zero in the input is what the field says, no more
    and no less (float block, many samples: no pixel's dependence hides behind a ReLU on all of them)."""
    gm, _ = fake_model(local())
    blocks = _spatial_blocks(gm)
    assert len(blocks) >= 2
    set_quantization(gm, False)
    for block, field in blocks:
        x = block_input(gm, block, X).detach().requires_grad_(True)
        sub = fx.GraphModule(gm, block_graph(block))
        out = sub(x)
        j = (out.shape[-2] // 2, out.shape[-1] // 2)
        out[..., j[0], j[1]].abs().sum().backward()
        reach = x.grad.abs().sum((0, 1))
        rows, cols = reach.sum(1).nonzero().flatten(), reach.sum(0).nonzero().flatten()
        for a, idx in ((0, rows), (1, cols)):
            assert int(idx.min()) == field.stride[a] * j[a] + field.lo[a], (block.name, a)
            assert int(idx.max()) == field.stride[a] * j[a] + field.hi[a], (block.name, a)
    set_quantization(gm, True)


def test_a_crop_reproduces_the_whole_map_output_bit_for_bit():
    gm, _ = fake_model(local(), w_bits=4, a_bits=4)
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for block, field in _spatial_blocks(gm):
        x = block_input(gm, block, X[:8])
        sub = fx.GraphModule(gm, block_graph(block))
        with torch.no_grad():
            full = sub(x)
            plan = plan_patches(field, tuple(x.shape[-2:]), tuple(full.shape[-2:]), 3)
            assert plan is not None
            corners = [window(plan, (0, 0)), window(plan, (plan.starts[0] - 1, plan.starts[1] - 1))]
            for win in corners + [sample_window(plan, gen) for _ in range(10)]:
                (crop,), target = crop_batch(win, (x,), full)      # what reconstruct trains on
                patch = crop_output(sub(crop), plan)
                assert patch.shape[-2:] == (3, 3)
                assert torch.equal(patch, target), block.name
                checked += 1
    assert checked >= 24


def test_non_local_blocks_and_small_maps_train_on_whole_maps():
    gm, _ = fake_model(local())
    blocks = split_blocks(gm)
    assert receptive_field(gm, blocks[-1]) is None                   # pool + classifier
    block, field = _spatial_blocks(gm)[-1]
    assert plan_patches(field, (14, 14), (14, 14), 7) is not None
    assert plan_patches(field, (14, 14), (14, 14), 8) is None        # the map is under twice the crop
    assert plan_patches(field, (14, 14), (14, 14), 0) is None


def test_reconstruction_on_crops_lowers_the_whole_map_loss_and_stays_exact():
    recon = {"iters": 150, "samples": 64, "batch": 16, "patch": 3}
    _, ctx = fake_model(local(), recon=ReconstructOptions(**recon), w_bits=4, a_bits=4)
    hist = ctx.reconstruct_history
    assert [h["patch"] for h in hist][:-1] == [3] * (len(hist) - 1) and hist[-1]["patch"] is None
    assert sum(h["loss_after"] for h in hist) < sum(h["loss_before"] for h in hist)
    qm = fxq.compile(local(), X, "shift-int", progress=False, w_bits=4, a_bits=4, reconstruct=recon)
    assert "3px crops" in next(n for n in qm.notes if n.startswith("reconstruct"))
    assert_three_executors(qm, X[:16])
    again = fxq.compile(local(), X, "shift-int", progress=False, w_bits=4, a_bits=4, reconstruct=recon)
    assert [c.tobytes() for n in qm.ir.nodes for c in n.consts.values()] == \
        [c.tobytes() for n in again.ir.nodes for c in n.consts.values()]


def test_without_the_option_nothing_is_cropped():
    _, ctx = fake_model(tiny("residual"), recon=ReconstructOptions(iters=5, samples=16, batch=8), w_bits=4, a_bits=4)
    assert ctx.reconstruct_history
    assert all(h["patch"] is None for h in ctx.reconstruct_history)


@pytest.mark.parametrize("value,needle", [
    ({"patch": -1}, "patch=-1"), ({"patch": 2.5}, "patch=2.5"), ({"patch": 4, "mode": "gptq"}, "learned modes"),
])
def test_bad_patch_options_are_named(value, needle):
    with pytest.raises(CalibrationError, match=needle):
        fxq.compile(tiny("residual"), X, "shift-int", progress=False, reconstruct=value)
