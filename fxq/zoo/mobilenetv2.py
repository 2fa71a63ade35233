"""MobileNetV2-style net for 1x28x28 inputs.

Depthwise convs and ReLU6 make it the hard case for per-tensor weight
quantization, which is why it sits in the zoo next to the ResNet.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion, out channels, repeats, first stride). As in the paper the first
# block does not expand: it runs at full 28x28 resolution, where a 4x expansion
# dominates training time on a 2-core CPU. The last stage stays at 7x7, since
# a further stride would leave a 4x4 map with little left to pool.
SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 1))


def _conv_bn(in_ch, out_ch, kernel, stride=1, groups=1, act=True):
    layers = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=False))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        # An expansion of 1 would be a square 1x1 conv that adds nothing. None,
        # not nn.Identity, because fx would keep an Identity node in the graph.
        self.expand = _conv_bn(in_ch, hidden, 1) if expansion != 1 else None
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = _conv_bn(hidden, out_ch, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Both branches below are fixed at construction: symbolic_trace sees one path.
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        if self.use_residual:
            out = out + x
        return out


class MobileNetV2(nn.Module):
    def __init__(self, settings=SETTINGS, stem=16, head=128, num_classes=10, dropout=0.1):
        super().__init__()
        self.stem = _conv_bn(1, stem, 3)
        blocks, in_ch = [], stem
        for expansion, out_ch, repeats, stride in settings:
            for i in range(repeats):
                blocks.append(
                    InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, expansion)
                )
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(in_ch, head, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.dropout(x))


def mobilenetv2(num_classes: int = 10) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes)
