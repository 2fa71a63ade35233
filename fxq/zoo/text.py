"""A small BERT-style sentence encoder: token ids in, an L2-normalised sentence embedding out.

Token embedding, position embedding, post-norm encoder blocks whose attention ignores padding (an
additive mask derived from the ids), mean pooling over the valid tokens and L2 normalisation: the
shape of the sentence-embedding models users bring, small enough for tests (random weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PAD_ID = 0
MASK_VALUE = -1e4


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)
        self.norm2 = nn.LayerNorm(dim)

    def _split(self, x):
        n, t, _ = x.shape
        return x.view(n, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, bias):
        n, t, d = x.shape
        scores = self._split(self.q(x)) @ self._split(self.k(x)).transpose(-2, -1) / self.head_dim ** 0.5
        attn = torch.softmax(scores + bias, dim=-1) @ self._split(self.v(x))
        x = self.norm1(x + self.o(attn.transpose(1, 2).reshape(n, t, d)))
        return self.norm2(x + self.fc2(F.gelu(self.fc1(x))))


class TextEncoder(nn.Module):
    def __init__(self, vocab: int = 500, dim: int = 32, depth: int = 2, heads: int = 4, mlp_ratio: int = 2,
                 max_len: int = 16, pad_id: int = PAD_ID):
        super().__init__()
        self.pad_id = pad_id
        self.tok = nn.Embedding(vocab, dim, padding_idx=pad_id)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.1)
        self.emb_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        valid = ids != self.pad_id                                         # [N, T]
        bias = (~valid).float()[:, None, None, :] * MASK_VALUE             # [N, 1, 1, T]: padding never attended
        x = self.emb_norm(self.tok(ids) + self.pos)
        for block in self.blocks:
            x = block(x, bias)
        m = valid.unsqueeze(-1).float()
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)                 # mean over the valid tokens
        return F.normalize(pooled, dim=-1)


def random_sentences(n: int, max_len: int = 16, vocab: int = 500, seed: int = 0) -> torch.Tensor:
    """Token ids of ``n`` sentences of random lengths (1..max_len), right-padded with PAD_ID."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, max_len), generator=g)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g)
    return torch.where(torch.arange(max_len)[None] < lengths[:, None], ids, torch.full_like(ids, PAD_ID))
