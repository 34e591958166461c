"""Two-tower retrieval (Yi et al., 2019): a query/user tower and an item tower map their ids to
unit vectors; relevance is their dot product over a temperature.

Training uses in-batch negatives (`score_items` on the batch's clicked items) with the
sampling-bias correction: an item appears as a negative as often as it is clicked, so its
log-frequency is subtracted from its training logits (otherwise popular items are pushed
down and full-catalogue retrieval suffers; measured on `small`: Recall@50 0.028 without the
correction, see docs/families.md). Serving scores
the whole catalogue against the **item-embedding index** (`index`): the item tower's vector of
every item, written by `refresh_index` after training. The index is a table the quantize stage
compresses like any other (row-wise int8/int4); it is an `ItemIndex`, so stages that change a
table's shape (factorize, row pruning) leave it alone and it always matches its towers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.models.dlrm import mlp
from tasks.modules.bag import mean_of_slots
from tasks.types import TwoTowerSpec


class ItemIndex(nn.Embedding):
    """The item-embedding index: one row per catalogue item, the item tower's output."""


def all_rows(table: nn.Module, rows: int) -> torch.Tensor:
    """Every row of an embedding table, whatever its (compressed) form."""
    weight = getattr(table, "weight", None)
    hooked = table._forward_hooks or table._forward_pre_hooks  # QAT's fake quantization
    if type(table) in (nn.Embedding, ItemIndex) and weight is not None and not hooked:
        return weight
    device = next(iter(table.buffers()), next(iter(table.parameters()), None))
    ids = torch.arange(rows, device=device.device if device is not None else None)
    return table(ids)


class TwoTower(nn.Module):
    item_log_q: torch.Tensor  # a buffer, set from the train split

    def __init__(self, spec: TwoTowerSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.item_table is None:
            raise ValueError("model two_tower: the dataset spec has no item_id column")
        d = spec.embedding_dim
        names = [t.name for t in spec.tables]
        item_cols = [spec.item_table, *spec.item_feature_tables]
        self._query = [i for i, n in enumerate(names) if n not in item_cols]
        self._item = [names.index(n) for n in item_cols]
        if not self._query:
            raise ValueError("model two_tower: no query/user-side id columns (every categorical "
                             "column is the item or an item feature)")
        bags = [n for n in item_cols if spec.tables[names.index(n)].multi_hot]
        if bags:
            raise ValueError(f"model two_tower: item columns {bags} are multi-hot; the item "
                             "tower reads one id per item column")
        self.n_items = spec.tables[self._item[0]].rows
        # a multi-hot query column pools its ids (their mean), as in the DLRM
        self.embeddings = nn.ModuleList(
            nn.EmbeddingBag(t.rows, d, mode="sum") if t.multi_hot else nn.Embedding(t.rows, d)
            for t in spec.tables)
        self._slots, start = [], 0  # each query table's slots of `sparse` (tasks.data)
        for t in self._query:
            width = spec.tables[t].multi_hot
            self._slots.append((start, width))
            start += width or 1
        for table in self.embeddings:
            nn.init.normal_(table.weight, 0, 0.05)
        self.query_tower = mlp([len(self._query) * d, *spec.tower_mlp, d], last_activation=False)
        self.item_tower = mlp([len(self._item) * d, *spec.tower_mlp, d], last_activation=False)
        # each item's feature ids (set from the train split, like dense statistics)
        self.register_buffer("catalogue", torch.zeros(self.n_items, len(self._item) - 1,
                                                      dtype=torch.long))
        # log of each item's share of the train clicks: the in-batch sampling probability,
        # subtracted from training logits (sampling-bias correction, Yi et al. 2019)
        self.register_buffer("item_log_q", torch.zeros(self.n_items))
        self.index = ItemIndex(self.n_items, d)
        self.temperature = spec.temperature
        self.in_batch_negatives = True

    def query_vectors(self, sparse: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.embeddings[t](sparse[:, c]) if width is None else
                       mean_of_slots(self.embeddings[t], sparse[:, c:c + width])
                       for t, (c, width) in zip(self._query, self._slots)], 1)
        return F.normalize(self.query_tower(x), dim=-1)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        feats = self.catalogue[items]
        x = torch.cat([self.embeddings[self._item[0]](items),
                       *(self.embeddings[t](feats[:, j]) for j, t in enumerate(self._item[1:]))],
                      1)
        return F.normalize(self.item_tower(x), dim=-1)

    def score_items(self, dense: torch.Tensor, sparse: torch.Tensor,
                    items: torch.Tensor) -> torch.Tensor:
        """[B, len(items)] scores of these items (training: in-batch negatives)."""
        return self.query_vectors(sparse) @ self.item_vectors(items).T / self.temperature

    @torch.no_grad()
    def refresh_index(self, chunk: int = 8192) -> None:
        """Write the item tower's vector of every item into the index (a plain one only: a
        compressed index was built from trained towers and stays as it is)."""
        if type(self.index) is not ItemIndex:
            return
        ids = torch.arange(self.n_items, device=self.catalogue.device)
        self.index.weight.copy_(torch.cat([self.item_vectors(ids[i:i + chunk])
                                           for i in range(0, self.n_items, chunk)]))

    def set_catalogue(self, catalogue: torch.Tensor) -> None:
        self.catalogue.copy_(catalogue)

    def set_item_frequency(self, clicks: torch.Tensor) -> None:
        """Clicks per item on the train split (for the sampling-bias correction)."""
        share = (clicks.double() + 1) / (clicks.sum() + len(clicks))
        self.item_log_q.copy_(share.log().float())

    def sampling_log_q(self, items: torch.Tensor) -> torch.Tensor:
        """log of each item's share of the train clicks: its in-batch sampling probability."""
        return self.item_log_q[items]

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """[B, n_items] scores of the whole catalogue (exact retrieval over the index)."""
        return self.query_vectors(sparse) @ all_rows(self.index, self.n_items).T / \
            self.temperature
