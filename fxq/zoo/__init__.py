"""Bundled FP32 reference models, trained on real Fashion-MNIST.

Weights ship in the repo so quantization results can be checked against a
known accuracy without a network; provenance records how they were made.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .mobilenetv2 import MobileNetV2, mobilenetv2
from .resnet import ResNet, resnet

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

MODELS = {
    "resnet": resnet,
    "mobilenetv2": mobilenetv2,
}


def names() -> list[str]:
    return sorted(MODELS)


def _check(name: str) -> None:
    if name not in MODELS:
        raise KeyError(f"unknown zoo model {name!r}; choose from {names()}")


def weights_path(name: str) -> Path:
    _check(name)
    return WEIGHTS_DIR / f"{name}_fmnist.pt"


def provenance_path(name: str) -> Path:
    _check(name)
    return WEIGHTS_DIR / f"{name}_fmnist.json"


def load(name: str, pretrained: bool = True) -> nn.Module:
    """Model in eval mode: quantization consumes BN running stats, never batch stats."""
    _check(name)
    model = MODELS[name]()
    if pretrained:
        path = weights_path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; train it with `python tools/train_zoo.py --model {name}`"
            )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def provenance(name: str) -> dict:
    with open(provenance_path(name)) as fh:
        return json.load(fh)


__all__ = ["MODELS", "MobileNetV2", "ResNet", "load", "mobilenetv2", "names", "provenance",
           "provenance_path", "resnet", "weights_path"]
