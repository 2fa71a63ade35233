"""expand_attention: SDPA and nn.MultiheadAttention become the explicit matmul/softmax form, exactly."""
from __future__ import annotations

import copy
import math
import operator
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxq import meta
from fxq.errors import UnsupportedOp
from fxq.passes.expand_attention import ATTENTION_LEAVES, CAUSAL_MASK_VALUE, expand_attention
from fxq.trace import trace

E, T = 16, 6
VOCAB = {torch.matmul, torch.transpose, operator.mul, torch.softmax, operator.add, torch.reshape}
SDPA = F.scaled_dot_product_attention


def _x(n, t=T, seed=0):
    return torch.randn(n, t, E, generator=torch.Generator().manual_seed(seed))


def expand(model, example=None):
    """(original traced names, expanded gm) for ``model`` traced with the attention leaves."""
    model.eval()
    gm = trace(copy.deepcopy(model), leaf_types=ATTENTION_LEAVES)
    before = {(n.op, n.target) for n in gm.graph.nodes}
    gm = expand_attention(gm, SimpleNamespace(example_input=_x(2) if example is None else example))
    return before, gm


def check_vocabulary(before, gm):
    """No fused attention left; every new node is in the pass's vocabulary, in its allowed form."""
    modules = dict(gm.named_modules())
    assert not any(isinstance(m, nn.MultiheadAttention) for m in modules.values())
    for n in gm.graph.nodes:
        assert not (n.op == "call_function" and "scaled_dot_product_attention" in str(n.target))
        if n.op == "call_module":
            assert type(modules[n.target]) is nn.Linear or (n.op, n.target) in before
        if (n.op, n.target) in before or n.op in ("placeholder", "output", "get_attr", "call_module"):
            continue
        assert n.op == "call_function" and n.target in VOCAB, n.format_node()
        if n.target is torch.reshape:
            shape = n.args[1]
            assert isinstance(shape, tuple) and all(isinstance(d, int) for d in shape)
            assert -1 not in shape[1:]
        if n.target is operator.mul:
            assert type(n.args[1]) is float
        if n.target is torch.softmax:
            assert n.args[1] == -1
        if n.target is torch.transpose:
            assert all(isinstance(d, int) for d in n.args[1:])


def check_equal(model, gm, batch=3, t=T):
    x = _x(batch, t, seed=1)        # another batch size than the example's 2: the reshapes' -1 works
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model.eval()(x), atol=1e-5, rtol=1e-5)


# -- SDPA --------------------------------------------------------------------------------------------

class Sdpa(nn.Module):
    """Single-head SDPA on [N, T, E]; ``kw`` goes to scaled_dot_product_attention, ``mask`` to a buffer."""

    def __init__(self, mask=None, s_len=None, **kw):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, 8)
        self.s_len, self.kw = s_len, kw
        self.register_buffer("mask", mask)

    def forward(self, x):
        mem = x if self.s_len is None else x[:, : self.s_len]
        if self.mask is not None:
            return SDPA(self.q(x), self.k(mem), self.v(mem), attn_mask=self.mask, **self.kw)
        return SDPA(self.q(x), self.k(mem), self.v(mem), **self.kw)


def _float_mask(t=T, s=T):
    g = torch.Generator().manual_seed(3)
    return torch.randn(t, s, generator=g) + (torch.rand(t, s, generator=g) > 0.7) * CAUSAL_MASK_VALUE


@pytest.mark.parametrize("kw", [
    {}, {"mask": "float"}, {"is_causal": True}, {"scale": 0.3}, {"is_causal": True, "scale": 0.7, "s_len": 4},
    {"mask": "float", "s_len": 4}], ids=["plain", "float_mask", "causal", "scale", "causal_cross", "mask_cross"])
def test_sdpa_matches(kw):
    kw = dict(kw)
    if kw.get("mask") == "float":
        kw["mask"] = _float_mask(T, kw.get("s_len") or T)
    model = Sdpa(**kw)
    before, gm = expand(model)
    check_vocabulary(before, gm)
    check_equal(model, gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.matmul) == 2 and targets.count(torch.softmax) == 1
    assert targets.count(operator.add) == (1 if ("mask" in kw or kw.get("is_causal")) else 0)


def test_sdpa_order_scale_and_causal_buffer():
    model = Sdpa(is_causal=True, s_len=4)
    _, gm = expand(model)
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in VOCAB]
    names = [getattr(n.target, "__name__", str(n.target)) for n in ops]
    assert names == ["transpose", "matmul", "mul", "add", "softmax", "matmul"]
    mul = ops[2]
    assert mul.args[1] == pytest.approx(1 / math.sqrt(E))
    mask_node = ops[3].args[1]
    assert mask_node.op == "get_attr"
    mask = getattr(gm, mask_node.target)
    assert mask.shape == (1, T, 4) and torch.isfinite(mask).all()    # batch-1 leading dim, rank of the scores
    assert torch.equal(mask[0], torch.triu(torch.full((T, 4), CAUSAL_MASK_VALUE), diagonal=1))


def test_sdpa_new_nodes_keep_the_source_line():
    _, gm = expand(Sdpa(is_causal=True))
    new = [n for n in gm.graph.nodes if n.op == "get_attr" or
           (n.op == "call_function" and n.target in VOCAB)]
    assert new and all("test_expand_attention.py" in n.meta.get(meta.SOURCE, "") for n in new)
    assert all("SDPA(" in n.meta[meta.SOURCE] for n in new)


def test_no_attention_is_a_no_op():
    model = nn.Sequential(nn.Linear(E, E), nn.ReLU())
    gm = trace(model)
    code = gm.code
    assert expand_attention(gm, SimpleNamespace(example_input=_x(2))).code == code


# -- three spellings -----------------------------------------------------------------------------------

class Heads(nn.Module):
    """Multi-head attention written by hand (``explicit``) or with SDPA, heads as fxq spells them."""

    def __init__(self, spelling, H=4):
        super().__init__()
        self.spelling, self.H, self.Dh = spelling, H, E // H
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(E, E) for _ in range(4))

    def heads(self, x):
        return torch.transpose(torch.reshape(x, (-1, T, self.H, self.Dh)), 1, 2)

    def forward(self, x):
        q, k, v = self.heads(self.q_proj(x)), self.heads(self.k_proj(x)), self.heads(self.v_proj(x))
        if self.spelling == "explicit":
            scores = torch.matmul(q, torch.transpose(k, -2, -1)) * (1.0 / math.sqrt(self.Dh))
            a = torch.matmul(torch.softmax(scores, -1), v)
        else:
            a = SDPA(q, k, v)
        return self.out_proj(torch.reshape(torch.transpose(a, 1, 2), (-1, T, E)))


class Mha(nn.Module):
    def __init__(self, H=4, **kw):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True, **kw)

    def forward(self, x):
        out, _ = self.mha(x, x, x, need_weights=False)
        return out


def _mha_like(heads: Heads) -> Mha:
    model = Mha(heads.H)
    with torch.no_grad():
        model.mha.in_proj_weight.copy_(torch.cat([heads.q_proj.weight, heads.k_proj.weight, heads.v_proj.weight]))
        model.mha.in_proj_bias.copy_(torch.cat([heads.q_proj.bias, heads.k_proj.bias, heads.v_proj.bias]))
        model.mha.out_proj.weight.copy_(heads.out_proj.weight)
        model.mha.out_proj.bias.copy_(heads.out_proj.bias)
    return model


def _op_kinds(gm):
    modules = dict(gm.named_modules())
    return [type(modules[n.target]).__name__ if n.op == "call_module" else (n.op, n.target)
            for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]


def test_three_spellings_one_graph_shape():
    torch.manual_seed(0)
    explicit = Heads("explicit").eval()
    sdpa = copy.deepcopy(explicit)
    sdpa.spelling = "sdpa"
    mha = _mha_like(explicit).eval()
    gms = [expand(m)[1] for m in (explicit, sdpa, mha)]
    kinds = [_op_kinds(gm) for gm in gms]
    assert kinds[0] == kinds[1] == kinds[2]
    assert kinds[0].count("Linear") == 4 and kinds[0].count(("call_function", torch.softmax)) == 1
    x = _x(3, seed=5)
    with torch.no_grad():
        ref = explicit(x)
        torch.testing.assert_close(mha(x), ref, atol=1e-5, rtol=1e-5)
        for gm in gms:
            torch.testing.assert_close(gm(x), ref, atol=1e-5, rtol=1e-5)


# -- nn.MultiheadAttention -----------------------------------------------------------------------------

class MhaCross(nn.Module):
    """Cross-attention: queries from x, keys/values from a projected prefix of x (S=4, kdim=vdim=12),
    with a float key_padding_mask and a float attn_mask (2-d buffer or 3-d [N*H, T, S] computed)."""

    def __init__(self, H=2, kpm=True, attn_mask=None, kdim=12):
        super().__init__()
        self.S, self.H, self.use_kpm, self.attn_mask_kind = 4, H, kpm, attn_mask
        self.mem = nn.Linear(E, kdim)
        self.mha = nn.MultiheadAttention(E, H, batch_first=True, kdim=kdim, vdim=kdim)
        self.register_buffer("mask2d", _float_mask(T, self.S))

    def forward(self, x):
        mem = self.mem(x[:, : self.S])
        kpm = (x[:, : self.S, 0] > 0.5).float() * CAUSAL_MASK_VALUE if self.use_kpm else None
        if self.attn_mask_kind == "2d":
            mask = self.mask2d
        elif self.attn_mask_kind == "3d":
            a, b = x[:, :, : self.S], x[:, :, self.S: 2 * self.S]
            mask = torch.reshape(torch.stack([a, b], 1), (-1, T, self.S))
        else:
            mask = None
        out, _ = self.mha(x, mem, mem, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
        return out


@pytest.mark.parametrize("H", [2, 4])
def test_mha_self_attention(H):
    torch.manual_seed(H)
    model = Mha(H)
    before, gm = expand(model)
    check_vocabulary(before, gm)
    check_equal(model, gm)
    assert sorted(n for n, m in gm.named_modules() if isinstance(m, nn.Linear)) == \
        ["mha.k_proj", "mha.out_proj", "mha.q_proj", "mha.v_proj"]


@pytest.mark.parametrize("kw", [{}, {"attn_mask": "2d"}, {"attn_mask": "3d"}, {"kpm": False, "kdim": E},
                                {"kpm": False, "attn_mask": "2d", "kdim": E}],
                         ids=["kpm", "kpm_mask2d", "kpm_mask3d", "same_dim", "same_dim_mask2d"])
def test_mha_cross_attention_with_masks(kw):
    torch.manual_seed(1)
    model = MhaCross(**kw)
    before, gm = expand(model)
    check_vocabulary(before, gm)
    check_equal(model, gm)


def test_mha_default_need_weights_unused_and_shared_module():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(E, 2, batch_first=True, bias=False)

        def forward(self, x):
            y, _ = self.mha(x, x, x)            # need_weights defaults to True; the weights are unused
            z, _ = self.mha(y, y, y)
            return z

    torch.manual_seed(2)
    model = Twice()
    before, gm = expand(model)
    check_vocabulary(before, gm)
    check_equal(model, gm)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert len(calls) == 8 and len(set(calls)) == 4       # the second call reuses the same projections
    src = [n.meta.get(meta.SOURCE, "") for n in gm.graph.nodes if n.op == "call_module"]
    assert all("self.mha(" in s for s in src)


# -- errors --------------------------------------------------------------------------------------------

class Custom(nn.Module):
    def __init__(self, fn, mha=None):
        super().__init__()
        self.fn, self.mha = fn, mha
        self.register_buffer("bool_mask", torch.rand(T, T, generator=torch.Generator().manual_seed(0)) > 0.5)

    def forward(self, x):
        return self.fn(self, x)


def _mha(**kw):
    return nn.MultiheadAttention(E, 2, **{"batch_first": True, **kw})


def _mha_out(self, x, **kw):
    return self.mha(x, x, x, **kw)[0]


ERRORS = {
    "bool_mask": (Custom(lambda s, x: SDPA(x, x, x, attn_mask=s.bool_mask)),
                  ["attn_mask is a boolean mask", "additive float mask"]),
    "dropout": (Custom(lambda s, x: SDPA(x, x, x, dropout_p=0.1)), ["dropout_p=0.1", "dropout_p=0.0"]),
    "gqa": (Custom(lambda s, x: SDPA(x, x, x, enable_gqa=True)), ["enable_gqa=True"]),
    "batch_first": (Custom(lambda s, x: _mha_out(s, x), _mha(batch_first=False)),
                    ["'mha'", "batch_first=False", "batch_first=True"]),
    "need_weights": (Custom(lambda s, x: s.mha(x, x, x)[1], _mha()), ["'mha'", "weights", "need_weights=False"]),
    "add_bias_kv": (Custom(lambda s, x: _mha_out(s, x), _mha(add_bias_kv=True)), ["'mha'", "add_bias_kv=True"]),
    "add_zero_attn": (Custom(lambda s, x: _mha_out(s, x), _mha(add_zero_attn=True)), ["add_zero_attn=True"]),
    "bool_kpm": (Custom(lambda s, x: _mha_out(s, x, key_padding_mask=x[:, :, 0] > 0), _mha()),
                 ["key_padding_mask is a boolean mask", "mask.float() * -10000"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_name_the_problem(case):
    model, words = ERRORS[case]
    with pytest.raises(UnsupportedOp) as info:
        expand(model)
    msg = str(info.value)
    assert msg.startswith("node '") and "test_expand_attention.py" in msg
    for w in words:
        assert w in msg, (w, msg)


def test_mha_training_mode_is_refused():
    model = Custom(lambda s, x: _mha_out(s, x), _mha())
    gm = trace(model.eval(), leaf_types=ATTENTION_LEAVES)
    gm.mha.train()
    with pytest.raises(UnsupportedOp, match="training mode"):
        expand_attention(gm, SimpleNamespace(example_input=_x(2)))
