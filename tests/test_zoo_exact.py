"""The bundled models: three executors agree on a sample of real test images, calibrated and data-free."""
import numpy as np
import pytest

import fxq
from conftest import assert_three_executors
from fxq import data, zoo


@pytest.fixture(scope="module")
def subset():
    x, y = data.load_test_subset()
    return x, y


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_three_executors_on_real_images(name, subset):
    x, y = subset
    qm = fxq.compile(zoo.load(name), x[:128], progress=False)
    assert_three_executors(qm, x[128:256])
    acc = 100 * float((qm.run(x[256:]).argmax(1) == y[256:].numpy()).mean())
    assert acc >= zoo.provenance(name)["fp32_test_accuracy"] - 3


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_data_free(name, subset):
    x, y = subset
    lo, hi = float(data.normalize(np.zeros(1, np.uint8))[0]), float(data.normalize(np.full(1, 255, np.uint8))[0])
    qm = fxq.compile(zoo.load(name), None, input_shape=(1, 1, 28, 28), input_range=(lo, hi), progress=False)
    assert any("BatchNorm statistics" in n for n in qm.notes)
    assert_three_executors(qm, x[:64])
    acc = 100 * float((qm.run(x).argmax(1) == y.numpy()).mean())
    assert acc >= zoo.provenance(name)["fp32_test_accuracy"] - 3
