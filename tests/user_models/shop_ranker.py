"""A user's own ranking model, defined outside the recsqueeze package: wide & deep
(Cheng et al., 2016). It follows the documented protocol (docs/byo-model.md) and nothing else:
built as `ShopRanker(spec)`, forward(dense, sparse) -> one click logit per row, embeddings are
nn.Embedding modules, hidden layers are nn.Linear inside nn.Sequential."""

from __future__ import annotations

import torch
from torch import nn


class ShopRanker(nn.Module):
    def __init__(self, spec) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        d = spec.embedding_dim
        hidden = int(spec.options.get("hidden", 64))
        self.tables = nn.ModuleList(nn.Embedding(t.rows, d) for t in spec.tables)
        self.deep = nn.Sequential(
            nn.Linear(len(spec.tables) * d + spec.num_dense, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.wide = nn.ModuleList(nn.Embedding(t.rows, 1) for t in spec.tables)
        self.dense_scale = nn.Parameter(torch.ones(spec.num_dense))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        vectors = [table(sparse[:, i]) for i, table in enumerate(self.tables)]
        deep = self.deep(torch.cat([*vectors, torch.tanh(dense * self.dense_scale)], 1))
        wide = sum(w(sparse[:, i]) for i, w in enumerate(self.wide))
        return (deep + wide).squeeze(1)
