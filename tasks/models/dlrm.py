"""DLRM-style CTR ranker (Naumov et al., 2019).

One embedding table per categorical feature (an `nn.EmbeddingBag` pooling the ids of a multi-hot
column, their mean), a bottom MLP mapping dense features to the
embedding width, pairwise dot-product interactions among all those vectors, and a top MLP over
[bottom output, interactions] to one logit. Dense inputs are standardized inside the model
(buffers set from the train split) so the model is usable on raw data.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.modules.bag import mean_of_slots
from tasks.types import DlrmSpec


def mlp(widths: list[int], last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2 or last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    dense_mean: torch.Tensor  # buffers, set from the train split
    dense_std: torch.Tensor

    def __init__(self, spec: DlrmSpec) -> None:
        super().__init__()
        self.spec = spec  # the architecture this module was built from (stages may change it)
        d = spec.embedding_dim
        dims = [spec.table_dims.get(t.name, d) for t in spec.tables]
        unknown = set(spec.table_dims) - {t.name for t in spec.tables}
        if unknown and spec.tables:
            raise ValueError(f"model.table_dims names tables the data does not have: "
                             f"{sorted(unknown)} (tables: {[t.name for t in spec.tables]})")
        # a multi-hot column's table pools its ids (their mean; padding slots weigh 0)
        self.embeddings = nn.ModuleList(
            nn.EmbeddingBag(t.rows, w, mode="sum") if t.multi_hot else nn.Embedding(t.rows, w)
            for t, w in zip(spec.tables, dims))
        self._starts, start = [], 0  # each table's first column of `sparse` (tasks.data)
        for t in spec.tables:
            self._starts.append(start)
            start += t.multi_hot or 1
        self._bags = {i: t.multi_hot for i, t in enumerate(spec.tables) if t.multi_hot}
        for table in self.embeddings:
            nn.init.uniform_(table.weight, -0.05, 0.05)
        # mixed-width tables (e.g. from NAS) are projected to the common width d
        self.projections = nn.ModuleDict(
            {str(i): nn.Linear(w, d, bias=False) for i, w in enumerate(dims) if w != d})
        self.register_buffer("dense_mean", torch.zeros(spec.num_dense))
        self.register_buffer("dense_std", torch.ones(spec.num_dense))
        self.bottom = mlp([spec.num_dense, *spec.bottom_mlp[:-1], d], last_activation=True) \
            if spec.num_dense else None
        n_vectors = len(spec.tables) + (1 if self.bottom is not None else 0)
        self._pairs = torch.triu_indices(n_vectors, n_vectors, offset=1)
        self._flat_pairs = self._pairs[0] * n_vectors + self._pairs[1]  # into the flat gram
        self._cat = spec.interaction == "cat"
        top_in = n_vectors * d if self._cat else \
            (d if self.bottom is not None else 0) + self._pairs.shape[1]
        # zero-padded up to a multiple of 32 so group-wise quantization (and SIMD tiles) divide
        # the first top layer evenly; the padding columns carry no signal and cost no accuracy
        self._pad = -top_in % 32
        self.top = mlp([top_in + self._pad, *spec.top_mlp, 1], last_activation=False)

    @torch.no_grad()
    def set_dense_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The train split's per-feature mean and std (tasks.protocol.NormalizesDense)."""
        self.dense_mean.copy_(mean)
        self.dense_std.copy_(std)

    def _pooled(self, sparse: torch.Tensor, i: int) -> torch.Tensor:
        """The mean of table i's vectors over the row's ids in its multi-hot slots."""
        start = self._starts[i]
        return mean_of_slots(self.embeddings[i], sparse[:, start:start + self._bags[i]])

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        columns = sparse.t().contiguous()  # one copy; each table's ids are then contiguous
        vectors = [self._pooled(sparse, i) if i in self._bags else table(columns[self._starts[i]])
                   for i, table in enumerate(self.embeddings)]
        for key, projection in self.projections.items():
            vectors[int(key)] = projection(vectors[int(key)])
        features = []
        if self.bottom is not None:
            x = self.bottom((dense - self.dense_mean) / self.dense_std)
            vectors.insert(0, x)
            features.append(x)
        if self._cat:
            features = vectors
        else:
            stacked = torch.stack(vectors, dim=1)  # [B, n, d]
            gram = torch.bmm(stacked, stacked.transpose(1, 2))
            flat = self._flat_pairs.to(gram.device)
            features.append(gram.flatten(1).index_select(1, flat))
        if self._pad:
            features.append(vectors[0].new_zeros(vectors[0].shape[0], self._pad))
        return self.top(torch.cat(features, dim=1)).squeeze(1)
