"""Real calibration/evaluation data that loads without a network.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``; a
500-image slice of its test set is committed so tests and demos work on
machines without that package.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
SUBSET_PATH = Path(__file__).resolve().parent / "zoo" / "data" / "fmnist_test_subset.npz"
SUBSET_SIZE = 500

# Per-pixel statistics of the Fashion-MNIST training set, shared by every
# loader so models see identically scaled inputs whatever the source.
MEAN = 0.2860
STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGE_MAGIC = 2051  # uint8, 3 dims
_LABEL_MAGIC = 2049  # uint8, 1 dim


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse a gzipped IDX file, refusing anything whose header disagrees with its body."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; install the Fashion-MNIST files with "
            "`apt-get install dataset-fashion-mnist`"
        )
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:  # bad gzip header or truncated stream
        raise ValueError(f"{path}: corrupt gzip stream ({exc})") from exc
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad IDX magic number {found:#x}, expected {magic:#x}")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header_len != expected:
        raise ValueError(
            f"{path}: IDX body has {len(raw) - header_len} bytes, header promises "
            f"{expected} for shape {shape}"
        )
    return np.frombuffer(raw, np.uint8, offset=header_len).reshape(shape)


def normalize(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N,28,28] or [N,1,28,28] -> float32 [N,1,28,28] in model input scale."""
    x = torch.from_numpy(np.asarray(images_u8, dtype=np.float32))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return (x / 255.0 - MEAN) / STD


def load_fashion_mnist_raw(split: str, root: str | Path | None = None):
    """Uint8 images [N,28,28] and int64 labels [N]; kept raw so the subset file stays exact."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_ROOT
    img_name, lbl_name = _FILES[split]
    images = _read_idx(root / img_name, _IMAGE_MAGIC)
    labels = _read_idx(root / lbl_name, _LABEL_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels.astype(np.int64)


def load_fashion_mnist(split: str, root: str | Path | None = None):
    """Full Fashion-MNIST split as (float32 [N,1,28,28], int64 [N])."""
    images, labels = load_fashion_mnist_raw(split, root)
    return normalize(images), torch.from_numpy(labels)


def fashion_mnist_available(root: str | Path | None = None) -> bool:
    root = Path(root) if root is not None else FASHION_MNIST_ROOT
    return all((root / f).is_file() for pair in _FILES.values() for f in pair)


def write_test_subset(path: str | Path | None = None, root: str | Path | None = None) -> Path:
    """Freeze the first SUBSET_SIZE official test images so tests need no Debian package."""
    path = Path(path) if path is not None else SUBSET_PATH
    images, labels = load_fashion_mnist_raw("test", root)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path, images=images[:SUBSET_SIZE].copy(), labels=labels[:SUBSET_SIZE].astype(np.uint8)
    )
    return path


def load_test_subset(path: str | Path | None = None):
    """First 500 Fashion-MNIST test images, from the committed .npz."""
    path = Path(path) if path is not None else SUBSET_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; regenerate it with `python tools/train_zoo.py --write-subset`"
        )
    with np.load(path) as npz:
        images, labels = npz["images"], npz["labels"]
    return normalize(images), torch.from_numpy(labels.astype(np.int64))


def load_digits_fallback():
    """sklearn's bundled 8x8 digits, resized to 28x28 in the same input scale.

    For calibration smoke runs where the Debian package is absent and the
    committed subset is not wanted. It is a different domain (digits, not
    clothing), so accuracies measured on it mean nothing for the zoo models.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; rescale to 0..255 like the IDX images.
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = x.clamp(0, 255).round()
    return (x / 255.0 - MEAN) / STD, torch.as_tensor(digits.target, dtype=torch.int64)
