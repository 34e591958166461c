"""What each problem kind trains on (DESIGN §12): what a model takes from the train split, the
scores and targets of a batch, and the losses. Metrics are in `tasks.quality`.

ranking    forward -> one click logit per row; BCE on the clicks.
retrieval  forward -> a score for every catalogue item; trained on in-batch negatives when the
           model offers them (`tasks.protocol.InBatchNegatives`: two-tower), else by softmax
           over the catalogue.
next_item  as retrieval, by softmax over the catalogue.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.data import Arrays
from tasks.losses import soft_label_bce
from tasks.protocol import (
    CorrectsSamplingBias,
    CountsItems,
    HasCatalogue,
    HasDerivedIndex,
    InBatchNegatives,
    NormalizesDense,
    ScoresItems,
)
from tasks.types import ProblemKind


def prepare(model: nn.Module, train: Arrays) -> None:
    """Give the model what it takes from the train split: dense-feature statistics, the item
    catalogue and each item's click count (each where the model has the capability)."""
    if isinstance(model, NormalizesDense) and train.dense.shape[1]:
        std = train.dense.std(axis=0)
        model.set_dense_statistics(torch.from_numpy(train.dense.mean(axis=0)),
                                   torch.from_numpy(np.where(std > 1e-6, std, 1.0)))
    if train.catalogue is None:
        return
    if isinstance(model, HasCatalogue):
        model.set_catalogue(torch.from_numpy(train.catalogue))
    if isinstance(model, CountsItems):
        clicks = np.bincount(train.label, minlength=len(train.catalogue))
        model.set_item_frequency(torch.from_numpy(clicks))


def finish(model: nn.Module) -> None:
    """After weights change: rebuild what is derived from them (the two-tower item index)."""
    if isinstance(model, HasDerivedIndex):
        model.refresh_index()


def in_batch(model: nn.Module) -> bool:
    """Whether `model` trains on in-batch negatives (the batch's clicked items)."""
    return isinstance(model, InBatchNegatives) and bool(model.in_batch_negatives)


def train_scores(model: nn.Module, kind: ProblemKind, dense: torch.Tensor, sparse: torch.Tensor,
                 label: torch.Tensor, items_of: nn.Module | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, targets) of one batch. Ranking: logits and clicks. Retrieval with in-batch
    negatives: [B, B] scores of the batch's clicked items, a repeated item masked out where it
    is not the row's own target, targets = the diagonal. Otherwise: [B, n_items] scores of the
    catalogue and the clicked items. `items_of` picks the candidate set (a student is scored on
    the same items as its teacher)."""
    if kind == "ranking":
        return model(dense, sparse), label
    target = label.long()
    if in_batch(items_of or model):
        if isinstance(model, ScoresItems):
            scores = model.score_items(dense, sparse, target)
        else:
            scores = model(dense, sparse)[:, target]
        if isinstance(model, CorrectsSamplingBias):  # in-batch sampling-bias correction
            scores = scores - model.sampling_log_q(target)[None, :]
        same = target[None, :] == target[:, None]
        same.fill_diagonal_(False)
        return scores.masked_fill(same, float("-inf")), torch.arange(len(target),
                                                                     device=target.device)
    return model(dense, sparse), target


def target_loss(kind: ProblemKind, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss on the batch's own targets: BCE on clicks, or softmax cross entropy."""
    if kind == "ranking":
        return F.binary_cross_entropy_with_logits(scores, targets)
    return F.cross_entropy(scores, targets)


def soft_loss(kind: ProblemKind, student: torch.Tensor, teacher: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """T² · cross entropy of the student's softened outputs against the teacher's."""
    if kind == "ranking":
        return soft_label_bce(student, teacher, temperature)
    t = F.softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student / temperature, dim=-1)
    return -(t * s.masked_fill(torch.isinf(s), 0.0)).sum(-1).mean() * temperature ** 2


@torch.inference_mode()
def valid_loss(model: nn.Module, kind: ProblemKind, data: Arrays, device: torch.device,
               batch_size: int = 4096) -> float:
    """Mean loss on `data` (early stopping): logloss, or softmax over the catalogue."""
    model.eval()
    finish(model)
    total = 0.0
    for i in range(0, len(data), batch_size):
        dense = torch.from_numpy(data.dense[i:i + batch_size]).to(device)
        sparse = torch.from_numpy(data.sparse[i:i + batch_size]).to(device)
        label = torch.from_numpy(data.label[i:i + batch_size]).to(device)
        out = model(dense, sparse)
        if kind == "ranking":
            total += float(F.binary_cross_entropy_with_logits(out.double(), label.double(),
                                                              reduction="sum"))
        else:
            total += float(F.cross_entropy(out.double(), label.long(), reduction="sum"))
    model.train()
    return total / max(len(data), 1)

