"""A user's ranker with `nn.EmbeddingBag` tables, laid out as people write them (TorchRec's
EmbeddingBagCollection, MLPerf's DLRMv2): bags in an `nn.ModuleDict` keyed by feature, modes
sum, mean and max, one table shared by two features, a bag fed as a 1-D input with `offsets`
and `per_sample_weights`, a multi-hot column pooled as a 2-D input with a `padding_idx`, and
normalization layers (BatchNorm on the dense features, a LayerNorm in the MLP). Built as
`BagRanker(spec)` on the built-in click log's columns, its multi-hot `recent_categories`
pooled when the dataset has it."""

from __future__ import annotations

import torch
from torch import nn


class BagRanker(nn.Module):
    def __init__(self, spec) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        d = spec.embedding_dim
        rows = {t.name: t.rows for t in spec.tables}
        self.start, at = {}, 0  # each column's first slot of `sparse` (a multi-hot one: several)
        for t in spec.tables:
            self.start[t.name], at = at, at + (t.multi_hot or 1)
        self.bags = nn.ModuleDict({
            "user_id": nn.EmbeddingBag(rows["user_id"], d, mode="sum"),
            "item_id": nn.EmbeddingBag(rows["item_id"], d, mode="mean"),
            "brand_id": nn.EmbeddingBag(rows["brand_id"], d, mode="max"),
            # one table for two features: a category and the user's segment share ids 0..39
            "category_id": nn.EmbeddingBag(rows["category_id"], d, mode="sum"),
            # device and hour pooled together: one weighted bag per row (1-D input + offsets)
            "context": nn.EmbeddingBag(rows["device"] + rows["hour"] + 1, d, mode="sum",
                                       padding_idx=0),
        })
        self.bags["user_segment"] = self.bags["category_id"]
        self.hour_offset = rows["device"] + 1
        self.recent = next((t.multi_hot for t in spec.tables if t.name == "recent_categories"),
                           None)
        if self.recent:  # ids shifted by one: row 0 pads (-1 -> 0), left out of the mean
            self.bags["recent_categories"] = nn.EmbeddingBag(
                rows["recent_categories"] + 1, d, mode="mean", padding_idx=0)
        n = 6 + bool(self.recent)
        self.dense_norm = nn.BatchNorm1d(spec.num_dense)
        self.mlp = nn.Sequential(nn.Linear(n * d + spec.num_dense, 64), nn.LayerNorm(64),
                                 nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        def col(name: str) -> torch.Tensor:
            return sparse[:, self.start[name]]

        vectors = [self.bags[name](col(name)[:, None]) for name in
                   ("user_id", "item_id", "brand_id", "category_id", "user_segment")]
        # per row: [device + 1, hour + offset], the hour weighted by half; padding id 0 unused
        flat = torch.stack([col("device") + 1, col("hour") + self.hour_offset], 1).reshape(-1)
        offsets = torch.arange(0, flat.numel(), 2, device=flat.device)
        weights = torch.tensor([1.0, 0.5], device=flat.device).expand(sparse.shape[0], 2)
        vectors.append(self.bags["context"](flat, offsets, per_sample_weights=weights.reshape(-1)))
        if self.recent:
            at = self.start["recent_categories"]
            vectors.append(self.bags["recent_categories"](sparse[:, at:at + self.recent] + 1))
        return self.mlp(torch.cat([*vectors, self.dense_norm(dense)], 1)).squeeze(1)
