"""A BERT-style sentence encoder: token ids in, L2-normalised embedding out (fxq.zoo.text)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxq
from fxq.backends import onnx_qdq
from fxq.errors import InputError
from fxq.ir import Op
from fxq.zoo.text import PAD_ID, TextEncoder, random_sentences


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TextEncoder().eval()


@pytest.mark.parametrize("islands", [(), "all"], ids=["integer-only", "float-islands"])
def test_text_encoder_compiles_lowers_and_exports_exactly(encoder, islands, tmp_path):
    qm = fxq.compile(encoder, random_sentences(64, seed=1), float_islands=islands, progress=False)
    ops = [n.op for n in qm.ir.nodes]
    assert qm.ir.input_type.dtype == "int64" and Op.QUANTIZE not in ops
    assert ops.count(Op.GATHER) == 1 and ops.count(Op.TOKEN_MASK) == 1
    if islands:    # emb_norm + 2 x (2 LayerNorms, softmax, GELU) + mean + L2
        assert qm.report().summary["float islands"] == "11 (2 gelu, 1 l2_normalize, 5 layer_norm, 1 masked_mean, 2 softmax)"
    else:
        assert qm.report().summary["float islands"] == 0
        assert ops.count(Op.MASKED_MEAN_INT) == ops.count(Op.L2NORM_INT) == 1
    x = random_sentences(16, seed=2)
    ref = qm.run_codes(x.numpy())
    qm.export_onnx(tmp_path / "enc.onnx")
    assert np.array_equal(qm.fake_codes(x), ref)
    assert np.array_equal(onnx_qdq.run_codes(qm.ir, tmp_path / "enc.onnx", x.numpy()), ref)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(qm.run(x.numpy())).float(), encoder(x))
    assert float(cos.min()) > 0.99
    qm.save(tmp_path / "enc.fxq")
    assert np.array_equal(fxq.load(tmp_path / "enc.fxq").run_codes(x.numpy()), ref)


def test_heavily_padded_sentences_follow_the_float_model(encoder):
    """One- and two-token sentences: 14-15 of 16 positions are padding. If the integer graph attended
    to or pooled padding, their embeddings would leave the float model's."""
    qm = fxq.compile(encoder, random_sentences(64, seed=1), progress=False)
    x = random_sentences(16, seed=3)
    x[:8, 1:] = PAD_ID
    x[8:, 2:] = PAD_ID
    from fxq.backends import reference
    env = reference.execute(qm.ir, x.numpy(), keep=True)
    mask = env[next(n.name for n in qm.ir.nodes if n.op is Op.TOKEN_MASK)]
    assert np.array_equal(mask, (x.numpy() != PAD_ID).astype(np.int64))
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(qm.run(x.numpy())).float(), encoder(x))
    assert float(cos.min()) > 0.99


def test_token_ids_outside_the_vocabulary_are_refused(encoder):
    qm = fxq.compile(encoder, random_sentences(32, seed=1), progress=False)
    x = random_sentences(2, seed=4)
    x[0, 0] = 10_000
    with pytest.raises(InputError, match="token ids outside"):
        qm.run(x.numpy())


@pytest.mark.parametrize("spelling", ["op", "method", "torch"])
def test_each_spelling_of_the_validity_comparison(spelling, tmp_path):
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(30, 8)

        def forward(self, ids):
            valid = {"op": lambda: ids != 0, "method": lambda: ids.ne(0), "torch": lambda: torch.ne(ids, 0)}[spelling]()
            m = valid.unsqueeze(-1).float()
            return (self.tok(ids) * m).sum(1) / m.sum(1).clamp(min=1)

    torch.manual_seed(0)
    ids = torch.randint(0, 30, (16, 5))
    qm = fxq.compile(Pool().eval(), ids, progress=False)
    assert [n.attrs.to_json() for n in qm.ir.nodes if n.op is Op.TOKEN_MASK] == [{"compare": "ne", "value": 0}]
    qm.export_onnx(tmp_path / "p.onnx")
    ref = qm.run_codes(ids.numpy())
    assert np.array_equal(qm.fake_codes(ids), ref)
    assert np.array_equal(onnx_qdq.run_codes(qm.ir, tmp_path / "p.onnx", ids.numpy()), ref)
