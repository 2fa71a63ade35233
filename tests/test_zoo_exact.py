"""The bundled models: three executors agree on a sample of real test images, calibrated and data-free."""
import numpy as np
import pytest
import torch

import fxq
from conftest import assert_three_executors
from fxq import data, zoo


def _agreement(model, qm, x) -> float:
    """Top-1 agreement with the FP32 model on the same images, in percent: the W8A8 graph should
    change almost no decisions (the ReLU6 format bug once dropped this to ~80% on mobilenetv2)."""
    with torch.no_grad():
        fp32 = model(x).argmax(1).numpy()
    return 100 * float((qm.run(x).argmax(1) == fp32).mean())


@pytest.fixture(scope="module")
def subset():
    x, y = data.load_test_subset()
    return x, y


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_three_executors_on_real_images(name, subset):
    x, y = subset
    qm = fxq.compile(zoo.load(name), x[:128], progress=False)
    assert_three_executors(qm, x[128:256])
    assert _agreement(zoo.load(name), qm, x[128:]) >= 97.0


@pytest.mark.parametrize("name", zoo.cnn_names())          # data-free formats need BatchNorm statistics
def test_zoo_model_data_free(name, subset):
    x, y = subset
    lo, hi = float(data.normalize(np.zeros(1, np.uint8))[0]), float(data.normalize(np.full(1, 255, np.uint8))[0])
    qm = fxq.compile(zoo.load(name), None, input_shape=(1, 1, 28, 28), input_range=(lo, hi), progress=False)
    assert any("BatchNorm statistics" in n for n in qm.notes)
    assert_three_executors(qm, x[:64])
    assert _agreement(zoo.load(name), qm, x) >= 97.0
