"""Crops of real photographs at the input size of the ImageNet zoo model, for calibration and
evaluation of post-training quantization.

The photos come from three offline sources:

* scikit-image's bundled sample photos and scikit-learn's ``load_sample_images()`` (pip packages);
* a few Debian packages that ship photographs (wallpapers, OpenCV's sample data), which
  ``tools/fetch_photos.py`` (``make photos``) downloads with ``apt-get download`` and unpacks
  under ``data/photos/debian/``.

This module never downloads anything: it reads what the fetch step left, and says so when it is
missing. Only real photographs are listed (no renders, drawings, charts, grey-scale scans or
near-duplicate stereo/sequence pairs).

Calibration and evaluation use disjoint photos: each photo goes to one split by a hash of its
name, so adding or removing a photo never moves another. Every photo yields ``CROPS_PER_PHOTO``
square crops at different positions and scales, resized to the model's input size. The crops
are cached as uint8 in an ``.npz`` next to the photos, so only the first call decodes images.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from fxq.zoo import efficientnet_lite

SPLITS = ("calib", "eval")
CROPS_PER_PHOTO = 8
CACHE_VERSION = 1

# Debian package -> (folder inside the package, photo paths relative to it).
DEBIAN_PHOTOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lomiri-wallpapers-16.04": ("usr/share/backgrounds", (
        "Bridge_by_Sander_Klootwijk.jpg",
        "Dragonfly_by_Bolly.jpg",
        "Picture_0B_by_freespace.jpg",
        "Picture_1A_by_freespace.jpg",
        "Wine_by_Jakkub_Mede.jpg",
        "aitzgorri_by_Aitzol_Berasategi.jpg",
        "free_by_Peter_Nerlich.jpg",
        "friends_by_Aitzol_Berasategi.jpg",
        "greentock_by_Peter_Nerlich.jpg",
        "life_by_Aitzol_Berasategi.jpg",
        "picosdeeuropa_by_Aitzol_Berasategi.jpg",
        "seeding_by_Clements_Engelhardt.jpg",
        "sunset_by_Aitzol_Berasategi.jpg",
    )),
    "lomiri-wallpapers-20.04": ("usr/share/backgrounds", (
        "Kleiber_by_Lukas_Baubkus.jpg",
    )),
    "python-matplotlib-data": ("usr/share/matplotlib/mpl-data/sample_data", (
        "grace_hopper.jpg",
    )),
    "opencv-doc": ("usr/share/doc/opencv-doc/examples", (
        "data/aero1.jpg",
        "data/aloeL.jpg",
        "data/apple.jpg",
        "data/baboon.jpg",
        "data/board.jpg",
        "data/building.jpg",
        "data/butterfly.jpg",
        "data/chicky_512.png",
        "data/ela_original.jpg",
        "data/fruits.jpg",
        "data/graf1.png",
        "data/home.jpg",
        "data/left.jpg",
        "data/leuvenA.jpg",
        "data/messi5.jpg",
        "data/orange.jpg",
        "data/rubberwhale1.png",
        "data/squirrel_cls.jpg",
        "data/stuff.jpg",
        "alphamat/input_images/plant.jpg",
        "dnn_superres/butterfly.png",
        "hfs/data/000.jpg",
        "hfs/data/001.jpg",
        "hfs/data/002.jpg",
        "text/scenetext01.jpg",
        "text/scenetext02.jpg",
        "text/scenetext03.jpg",
        "text/scenetext04.jpg",
        "text/scenetext05.jpg",
        "text/scenetext06.jpg",
        "text/scenetext_segmented_word01.jpg",
        "text/scenetext_segmented_word02.jpg",
        "text/scenetext_segmented_word03.jpg",
        "text/scenetext_segmented_word04.jpg",
        "text/scenetext_segmented_word05.jpg",
    )),
}

# Colour photographs bundled in the pip packages (motorcycle_right is the other stereo view).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                  "motorcycle_left.png", "hubble_deep_field.jpg")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")

MANIFEST = "MANIFEST.json"  # written by tools/fetch_photos.py once every package is unpacked


class PhotosMissing(FileNotFoundError):
    pass


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Where the fetched photos and the crop cache live: $FXQ_PHOTOS_DIR or <repo>/data/photos."""
    env = os.environ.get("FXQ_PHOTOS_DIR")
    return Path(env) if env else repo_root() / "data" / "photos"


def debian_dir() -> Path:
    return data_dir() / "debian"


def debian_photo_path(package: str, rel: str) -> Path:
    return debian_dir() / package / rel


def _skimage_dir() -> Path:
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError("the photo set needs scikit-image (pip install scikit-image)") from e
    return Path(skimage.data.__file__).resolve().parent


def _sklearn_dir() -> Path:
    try:
        import sklearn.datasets
    except ImportError as e:
        raise ImportError("the photo set needs scikit-learn (pip install scikit-learn)") from e
    return Path(sklearn.datasets.__file__).resolve().parent / "images"


def pip_photo_sources() -> list[tuple[str, Path]]:
    """(name, file) of the photos bundled in scikit-image and scikit-learn (no fetch step needed)."""
    out = [(f"skimage/{f}", _skimage_dir() / f) for f in SKIMAGE_PHOTOS]
    out += [(f"sklearn/{f}", _sklearn_dir() / f) for f in SKLEARN_PHOTOS]
    return out


def photo_sources() -> list[tuple[str, Path]]:
    """(name, file) of every photo, in a fixed order; raises if any file is missing."""
    out = pip_photo_sources()
    for package, (_, files) in DEBIAN_PHOTOS.items():
        out += [(f"{package}/{rel}", debian_photo_path(package, rel)) for rel in files]
    missing = [str(p) for _, p in out if not p.is_file()]
    if missing:
        raise PhotosMissing(
            f"{len(missing)} of {len(out)} photos are missing (first: {missing[0]}); the Debian "
            f"photo packages are fetched at install time: run `make photos` "
            f"(tools/fetch_photos.py) to download and unpack them into {debian_dir()}"
        )
    return out


def split_of(name: str) -> str:
    """'calib' or 'eval', from a hash of the photo's name alone."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return SPLITS[h % 2]


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(b"crops:" + name.encode()).digest()[:8], "big"))


def crop_boxes(name: str, width: int, height: int, n: int = CROPS_PER_PHOTO) -> list[tuple[int, int, int]]:
    """n square crop boxes (left, top, side) inside a width x height photo, deterministic per name.

    The centre square of the full short side, the four corners at 0.7 of it, the centre at 0.5,
    and the rest at random positions with a random side in [0.4, 0.9] of the short side.
    """
    short = min(width, height)

    def box(cx: float, cy: float, frac: float) -> tuple[int, int, int]:
        side = max(1, round(short * frac))
        left = min(max(0, round(cx * (width - side))), width - side)
        top = min(max(0, round(cy * (height - side))), height - side)
        return left, top, side

    boxes = [box(0.5, 0.5, 1.0)]
    boxes += [box(cx, cy, 0.7) for cx, cy in ((0, 0), (1, 0), (0, 1), (1, 1))]
    boxes.append(box(0.5, 0.5, 0.5))
    rng = _rng(name)
    while len(boxes) < n:
        boxes.append(box(rng.uniform(), rng.uniform(), rng.uniform(0.4, 0.9)))
    return boxes[:n]


def _load_rgb(path: Path):
    from PIL import Image

    img = Image.open(path)
    img.load()
    return img.convert("RGB")  # drops the (almost everywhere opaque) alpha of the PNGs


def _crops_of(name: str, path: Path, size: int, first: int = 0,
              per_photo: int = CROPS_PER_PHOTO) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    from PIL import Image

    img = _load_rgb(path)
    boxes = crop_boxes(name, *img.size, n=per_photo)[first:]
    crops = []
    for left, top, side in boxes:
        region = img.crop((left, top, left + side, top + side))
        # PIL widens the bicubic kernel when shrinking, so big photos are antialiased.
        crops.append(np.asarray(region.resize((size, size), Image.BICUBIC), dtype=np.uint8))
    return np.stack(crops), boxes


def _signature(size: int) -> str:
    names = [n for n, _ in photo_sources()]
    text = f"v{CACHE_VERSION} size={size} per={CROPS_PER_PHOTO} " + " ".join(names)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(size: int = efficientnet_lite.INPUT_SIZE) -> Path:
    return data_dir() / f"crops_{size}.npz"


def build_cache(size: int = efficientnet_lite.INPUT_SIZE, force: bool = False) -> Path:
    """Decode every photo, cut its crops and save them (uint8 NHWC) to ``cache_path(size)``."""
    path = cache_path(size)
    sources = photo_sources()
    sig = _signature(size)
    if not force and path.is_file():
        with np.load(path) as z:
            if str(z["signature"]) == sig:
                return path
    crops, names, boxes = [], [], []
    for name, file in sources:
        c, b = _crops_of(name, file, size)
        crops.append(c)
        names += [name] * len(c)
        boxes += b
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, crops=np.concatenate(crops), names=np.array(names), boxes=np.array(boxes, dtype=np.int64),
             signature=np.array(sig))
    tmp.replace(path)
    return path


def _load(size: int) -> tuple[np.ndarray, list[str]]:
    path = build_cache(size)
    with np.load(path) as z:
        return z["crops"], [str(n) for n in z["names"]]


def photo_crops_uint8(split: str, size: int = efficientnet_lite.INPUT_SIZE) -> tuple[np.ndarray, list[str]]:
    """uint8 crops [N, size, size, 3] (RGB) of one split, and the source photo name of each crop."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    crops, names = _load(size)
    keep = [i for i, n in enumerate(names) if split_of(n) == split]
    return crops[keep], [names[i] for i in keep]


def photo_crops(split: str, size: int = efficientnet_lite.INPUT_SIZE) -> tuple[torch.Tensor, list[str]]:
    """Crops of one split as the EfficientNet-Lite input: float [N, 3, size, size], (x - 127) / 128.

    Returns the tensor and, for each crop, the name of the photo it was cut from. The "calib" and
    "eval" splits never share a photo.
    """
    crops, names = photo_crops_uint8(split, size)
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2)
    return efficientnet_lite.normalize(x), names


def more_photo_crops(split: str, per_photo: int, size: int = efficientnet_lite.INPUT_SIZE) -> torch.Tensor:
    """Crops ``CROPS_PER_PHOTO .. per_photo - 1`` of every photo of ``split`` (random boxes, as
    ``crop_boxes`` continues them), normalised like ``photo_crops``: a second look at the same photos
    with crops no calibration or evaluation choice has seen. Decoded on each call, not cached."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if per_photo <= CROPS_PER_PHOTO:
        raise ValueError(f"per_photo={per_photo} must exceed CROPS_PER_PHOTO={CROPS_PER_PHOTO}")
    crops = [_crops_of(name, path, size, CROPS_PER_PHOTO, per_photo)[0]
             for name, path in photo_sources() if split_of(name) == split]
    x = torch.from_numpy(np.ascontiguousarray(np.concatenate(crops))).permute(0, 3, 1, 2)
    return efficientnet_lite.normalize(x)


def pip_photo_crops(split: str, size: int = efficientnet_lite.INPUT_SIZE,
                    limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Like ``photo_crops``, but only from the scikit-image/scikit-learn photos, which the pip install
    provides (no ``make photos``, no cache file written): for tests on a fresh machine. Same split rule
    and crops as the full set (2 calibration and 6 evaluation photos, 8 crops each); ``limit`` keeps
    the first N crops and decodes only the photos they need.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    crops, names = [], []
    for name, file in pip_photo_sources():
        if split_of(name) != split:
            continue
        if limit is not None and len(names) >= limit:
            break
        if not file.is_file():
            raise PhotosMissing(f"{file} is missing from the installed scikit-image/scikit-learn")
        c, _ = _crops_of(name, file, size)
        crops.append(c)
        names += [name] * len(c)
    arr = np.concatenate(crops)[:limit]
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    return efficientnet_lite.normalize(x), names[:limit]


def summary(size: int = efficientnet_lite.INPUT_SIZE) -> dict[str, dict[str, int]]:
    """{split: {"photos": n, "crops": n}}."""
    _, names = _load(size)
    out = {}
    for split in SPLITS:
        mine = [n for n in names if split_of(n) == split]
        out[split] = {"photos": len(set(mine)), "crops": len(mine)}
    return out


if __name__ == "__main__":
    for split, counts in summary().items():
        print(f"{split}: {counts['photos']} photos, {counts['crops']} crops")
