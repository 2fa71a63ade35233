"""Zoo models and the data they were trained on.

The accuracy check runs on the committed 500-image subset, so it needs
neither the Debian dataset package nor a network.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
import torch.fx

from fxq import data, zoo


@pytest.fixture(scope="module")
def subset():
    return data.load_test_subset()


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_loads_traces_and_is_accurate(name, subset):
    model = zoo.load(name)
    assert not model.training
    assert all(not m.training for m in model.modules())

    gm = torch.fx.symbolic_trace(model)
    x, y = subset
    with torch.no_grad():
        eager = model(x)
        traced = gm(x)
    torch.testing.assert_close(traced, eager)

    acc = 100.0 * (eager.argmax(1) == y).float().mean().item()
    recorded = zoo.provenance(name)["fp32_test_accuracy"]
    assert acc >= recorded - 3.0, f"{name}: {acc:.2f}% on subset vs {recorded}% recorded"


@pytest.mark.parametrize("name", zoo.names())
def test_provenance_fields(name):
    record = zoo.provenance(name)
    for key in ("model", "seed", "epochs", "batch_size", "lr", "optimizer",
                "fp32_test_accuracy", "train_seconds", "torch_version", "date", "command"):
        assert key in record
    assert record["model"] == name
    assert zoo.weights_path(name).stat().st_size < 2 * 1024 * 1024


def test_unpretrained_load_and_unknown_name():
    assert not zoo.load("resnet", pretrained=False).training
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.load("vgg")


def test_subset_format(subset):
    x, y = subset
    assert x.shape == (data.SUBSET_SIZE, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (data.SUBSET_SIZE,) and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) <= 9


@pytest.mark.skipif(not data.fashion_mnist_available(),
                    reason="needs `apt-get install dataset-fashion-mnist`")
def test_subset_matches_official_test_set(subset):
    x, y = data.load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    torch.testing.assert_close(subset[0], x[: data.SUBSET_SIZE], rtol=0, atol=0)
    assert torch.equal(subset[1], y[: data.SUBSET_SIZE])


def _write_idx(path, magic, shape, body: bytes):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + body)


def _write_split(root, n=3, images_body=None, labels_magic=2049):
    images = np.arange(n * 28 * 28, dtype=np.uint8).tobytes()
    _write_idx(root / "t10k-images-idx3-ubyte.gz", 2051, (n, 28, 28),
               images if images_body is None else images_body)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", labels_magic, (n,), bytes(range(n)))


def test_loader_reads_a_valid_idx_root(tmp_path):
    _write_split(tmp_path)
    x, y = data.load_fashion_mnist("test", root=tmp_path)
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [0, 1, 2]


def test_truncated_idx_body_is_rejected(tmp_path):
    _write_split(tmp_path, images_body=bytes(3 * 28 * 28 - 100))
    with pytest.raises(ValueError, match="header promises"):
        data.load_fashion_mnist("test", root=tmp_path)


def test_truncated_gzip_stream_is_rejected(tmp_path):
    _write_split(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="corrupt gzip"):
        data.load_fashion_mnist("test", root=tmp_path)


def test_wrong_magic_is_rejected(tmp_path):
    _write_split(tmp_path, labels_magic=2051)
    with pytest.raises(ValueError, match="magic"):
        data.load_fashion_mnist("test", root=tmp_path)


def test_missing_files_name_the_debian_package(tmp_path):
    assert not data.fashion_mnist_available(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist("train", root=tmp_path)


def test_digits_fallback_shares_the_input_scale():
    x, y = data.load_digits_fallback()
    assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and len(x) == len(y)
    # Pixel 0 maps to the same value as an empty Fashion-MNIST pixel.
    assert float(x.min()) == pytest.approx(-data.MEAN / data.STD)
