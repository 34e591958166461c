"""A user's own ranking model, defined outside the recsqueeze package: wide & deep
(Cheng et al., 2016). It follows the documented protocol (docs/byo-model.md) and nothing else:
built as `ShopRanker(spec)`, forward(dense, sparse) -> one click logit per row, embeddings are
nn.Embedding modules (an nn.EmbeddingBag for a multi-hot column: the mean of its slots' ids,
shifted by one so that the -1 padding is its padding_idx 0), hidden layers are nn.Linear inside
nn.Sequential."""

from __future__ import annotations

import torch
from torch import nn


class ShopRanker(nn.Module):
    def __init__(self, spec) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        d = spec.embedding_dim
        hidden = int(spec.options.get("hidden", 64))
        self.slots, at = [], 0  # each table's slots of `sparse` (docs/byo-model.md)
        for t in spec.tables:
            self.slots.append((at, t.multi_hot))
            at += t.multi_hot or 1
        self.tables = nn.ModuleList(_table(t, d) for t in spec.tables)
        self.deep = nn.Sequential(
            nn.Linear(len(spec.tables) * d + spec.num_dense, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.wide = nn.ModuleList(_table(t, 1) for t in spec.tables)
        self.dense_scale = nn.Parameter(torch.ones(spec.num_dense))

    def _lookup(self, table: nn.Module, sparse: torch.Tensor, i: int) -> torch.Tensor:
        at, width = self.slots[i]
        return table(sparse[:, at]) if width is None else table(sparse[:, at:at + width] + 1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        vectors = [self._lookup(table, sparse, i) for i, table in enumerate(self.tables)]
        deep = self.deep(torch.cat([*vectors, torch.tanh(dense * self.dense_scale)], 1))
        wide = sum(self._lookup(w, sparse, i) for i, w in enumerate(self.wide))
        return (deep + wide).squeeze(1)


def _table(t, width: int) -> nn.Module:  # type: ignore[no-untyped-def]
    if t.multi_hot:
        return nn.EmbeddingBag(t.rows + 1, width, mode="mean", padding_idx=0)
    return nn.Embedding(t.rows, width)
