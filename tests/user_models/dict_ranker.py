"""A user's ranker laid out unlike the built-in DLRM, trained by the user's own loop and
imported (tests/e2e/test_imported_model.py): tables in an `nn.ModuleDict` keyed by column,
dense features through `BatchNorm1d` (running statistics are buffers of its state_dict),
an MLP with a `LayerNorm` between its Linear layers, a multi-hot column pooled by an
`nn.EmbeddingBag` (mean). Built as `DictRanker(spec)`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DictRanker(nn.Module):
    def __init__(self, spec) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        d, hidden = spec.embedding_dim, int(spec.options.get("hidden", 64))
        self.columns = [t.name for t in spec.tables]
        self.slots, at = {}, 0  # each column's slots of `sparse` (docs/byo-model.md)
        for t in spec.tables:
            self.slots[t.name] = (at, t.multi_hot)
            at += t.multi_hot or 1
        self.tables = nn.ModuleDict({  # a bag's ids are shifted by one: -1 pads as row 0
            t.name: nn.EmbeddingBag(t.rows + 1, d, mode="mean", padding_idx=0) if t.multi_hot
            else nn.Embedding(t.rows, d) for t in spec.tables})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.05)
        self.dense_norm = nn.BatchNorm1d(spec.num_dense)
        self.mlp = nn.Sequential(
            nn.Linear(len(self.columns) * d + spec.num_dense, hidden), nn.LayerNorm(hidden),
            nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        vectors = [self.tables[name](sparse[:, at]) if width is None else
                   self.tables[name](sparse[:, at:at + width] + 1)
                   for name, (at, width) in self.slots.items()]
        return self.mlp(torch.cat([*vectors, self.dense_norm(dense)], 1)).squeeze(1)


def fit(model: nn.Module, dense, sparse, label, epochs: int = 2,  # type: ignore[no-untyped-def]
        batch_size: int = 256, seed: int = 0) -> nn.Module:
    """The user's own training loop (not recsqueeze's): Adam on BCE, shuffled batches."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    dense, sparse = torch.as_tensor(dense), torch.as_tensor(sparse)
    label = torch.as_tensor(label).float()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(label), generator=gen).split(batch_size):
            loss = F.binary_cross_entropy_with_logits(model(dense[idx], sparse[idx]), label[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
