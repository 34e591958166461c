"""DLRM-style CTR ranker (Naumov et al., 2019).

One embedding table per categorical feature, a bottom MLP mapping dense features to the
embedding width, pairwise dot-product interactions among all those vectors, and a top MLP over
[bottom output, interactions] to one logit. Dense inputs are standardized inside the model
(buffers set from the train split) so the model is usable on raw data.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.types import ModelSpec


def mlp(widths: list[int], last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2 or last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec  # the architecture this module was built from (stages may change it)
        d = spec.embedding_dim
        self.embeddings = nn.ModuleList(nn.Embedding(t.rows, d) for t in spec.tables)
        for table in self.embeddings:
            nn.init.uniform_(table.weight, -0.05, 0.05)
        self.register_buffer("dense_mean", torch.zeros(spec.num_dense))
        self.register_buffer("dense_std", torch.ones(spec.num_dense))
        self.bottom = mlp([spec.num_dense, *spec.bottom_mlp[:-1], d], last_activation=True) \
            if spec.num_dense else None
        n_vectors = len(spec.tables) + (1 if self.bottom is not None else 0)
        self._pairs = torch.triu_indices(n_vectors, n_vectors, offset=1)
        top_in = (d if self.bottom is not None else 0) + self._pairs.shape[1]
        # zero-padded up to a multiple of 32 so group-wise quantization (and SIMD tiles) divide
        # the first top layer evenly; the padding columns carry no signal and cost no accuracy
        self._pad = -top_in % 32
        self.top = mlp([top_in + self._pad, *spec.top_mlp, 1], last_activation=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        vectors = [table(sparse[:, i]) for i, table in enumerate(self.embeddings)]
        features = []
        if self.bottom is not None:
            x = self.bottom((dense - self.dense_mean) / self.dense_std)
            vectors.insert(0, x)
            features.append(x)
        stacked = torch.stack(vectors, dim=1)  # [B, n, d]
        gram = torch.bmm(stacked, stacked.transpose(1, 2))
        features.append(gram[:, self._pairs[0], self._pairs[1]])
        if self._pad:
            features.append(gram.new_zeros(gram.shape[0], self._pad))
        return self.top(torch.cat(features, dim=1)).squeeze(1)
