"""SASRec (Kang & McAuley, 2018): a causal transformer over the user's history of item ids;
the last position's state scores every catalogue item through the (tied) item table.

Attention heads live in `SelfAttention` with separate q/k/v/o Linear layers, so quantization
and low-rank factorization reach them like any Linear and structured pruning can remove whole
heads (`prune_heads`); each block's feed-forward is a Sequential(Linear, GELU, Linear) whose
hidden channels structured pruning removes. The head count follows the weights' shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tasks.models.two_tower import all_rows
from tasks.types import SasrecSpec


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        inner = heads * head_dim
        self.q, self.k, self.v = (nn.Linear(dim, inner) for _ in range(3))
        self.o = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, -1, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)),
                                             split(self.v(x)), attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, dim // heads)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attention(self.norm1(x), mask))
        return x + self.drop(self.ffn(self.norm2(x)))


class SASRec(nn.Module):
    def __init__(self, spec: SasrecSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.item_table is None:
            raise ValueError("model sasrec: the dataset spec has no item_id column")
        item = next(t for t in spec.tables if t.name == spec.item_table)
        d, self.n_items, self.max_history = spec.embedding_dim, item.rows, spec.max_history
        # row n_items is the padding row (an empty or short history)
        self.embeddings = nn.ModuleList([nn.Embedding(item.rows + 1, d),
                                         nn.Embedding(spec.max_history, d)])
        for table in self.embeddings:
            nn.init.normal_(table.weight, 0, 0.05)
        self.blocks = nn.ModuleList(Block(d, spec.heads, spec.ffn_dim, spec.dropout)
                                    for _ in range(spec.layers))
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(spec.dropout)
        self.scale = math.sqrt(d)

    def encode(self, sparse: torch.Tensor) -> torch.Tensor:
        """The user state after the history: [B, d]."""
        history = sparse[:, -self.max_history:]
        n = history.shape[1]
        pad = history < 0
        ids = torch.where(pad, torch.full_like(history, self.n_items), history)
        positions = torch.arange(self.max_history - n, self.max_history, device=sparse.device)
        x = self.drop(self.embeddings[0](ids) * self.scale + self.embeddings[1](positions))
        causal = torch.ones(n, n, dtype=torch.bool, device=sparse.device).tril()
        keys = ~pad
        keys[:, -1] = True  # the last position is always visible: an empty history is a state
        mask = (causal[None] & keys[:, None, :])[:, None]  # [B, 1, n, n]
        mask = mask | torch.eye(n, dtype=torch.bool, device=sparse.device)  # no empty rows
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x[:, -1])

    def score_items(self, dense: torch.Tensor, sparse: torch.Tensor,
                    items: torch.Tensor) -> torch.Tensor:
        return self.encode(sparse) @ self.embeddings[0](items).T

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """[B, n_items] scores of the whole catalogue."""
        items = all_rows(self.embeddings[0], self.n_items + 1)[:self.n_items]
        return self.encode(sparse) @ items.T
