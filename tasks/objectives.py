"""What each task trains on and measures (ranking, retrieval, next_item; DESIGN §7).

ranking    forward -> one click logit per row; BCE; AUC (DeLong), logloss, NDCG@K over the
           rows of each query/session (the dataset's query_id), AUC per segment value.
retrieval  forward -> a score for every catalogue item; trained on in-batch negatives when the
           model offers `score_items` and sets `in_batch_negatives` (two-tower), else softmax
           over the catalogue; Recall@K and NDCG@K of the clicked item by exact top-K over the
           whole catalogue, per row, overall and per segment value.
next_item  as retrieval (HR@K instead of Recall@K; one relevant item, so they coincide),
           trained by softmax over the catalogue.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.data import Arrays
from tasks.metrics import (
    auc_with_ci,
    logloss,
    normal_quantile,
    paired_auc_loss,
    paired_bootstrap_upper,
    row_logloss,
)
from tasks.types import MAIN_METRIC, Estimate, PairedDelta

DEFAULT_KS = (10, 50)
MAX_SEGMENT_VALUES = 50


def prepare(model: nn.Module, train: Arrays) -> None:
    """Set what a model takes from the train split: dense statistics, the item catalogue."""
    from tasks.train import set_dense_normalization

    set_dense_normalization(model, train)
    if train.catalogue is not None and hasattr(model, "set_catalogue"):
        model.set_catalogue(torch.from_numpy(train.catalogue))
        if hasattr(model, "set_item_frequency"):
            items = len(train.catalogue)
            model.set_item_frequency(torch.from_numpy(np.bincount(train.label, minlength=items)))


def finish(model: nn.Module) -> None:
    """After weights change: rebuild what is derived from them (the two-tower item index)."""
    if hasattr(model, "refresh_index"):
        model.refresh_index()


# --- training ------------------------------------------------------------------------------
def in_batch(model: nn.Module) -> bool:
    return bool(getattr(model, "in_batch_negatives", False)) and hasattr(model, "score_items")


def train_scores(model: nn.Module, task: str, dense: torch.Tensor, sparse: torch.Tensor,
                 label: torch.Tensor, items_of: nn.Module | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, targets) of one batch. Ranking: logits and clicks. Retrieval with in-batch
    negatives: [B, B] scores of the batch's clicked items, a repeated item masked out where it
    is not the row's own target, targets = the diagonal. Otherwise: [B, n_items] scores of the
    catalogue and the clicked items. `items_of` picks the candidate set (a student is scored on
    the same items as its teacher)."""
    if task == "ranking":
        return model(dense, sparse), label
    target = label.long()
    if in_batch(items_of or model):
        if hasattr(model, "score_items"):
            scores = model.score_items(dense, sparse, target)
        else:
            scores = model(dense, sparse)[:, target]
        log_q = getattr(model, "item_log_q", None)
        if log_q is not None:  # sampling-bias correction of in-batch negatives
            scores = scores - log_q[target][None, :]
        same = target[None, :] == target[:, None]
        same.fill_diagonal_(False)
        return scores.masked_fill(same, float("-inf")), torch.arange(len(target),
                                                                     device=target.device)
    return model(dense, sparse), target


def task_loss(task: str, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if task == "ranking":
        return F.binary_cross_entropy_with_logits(scores, targets)
    return F.cross_entropy(scores, targets)


def soft_loss(task: str, student: torch.Tensor, teacher: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """T² · cross entropy of the student's softened outputs against the teacher's."""
    if task == "ranking":
        from tasks.losses import soft_label_bce

        return soft_label_bce(student, teacher, temperature)
    t = F.softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student / temperature, dim=-1)
    return -(t * s.masked_fill(torch.isinf(s), 0.0)).sum(-1).mean() * temperature ** 2


@torch.inference_mode()
def valid_loss(model: nn.Module, task: str, data: Arrays, device: torch.device,
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
        if task == "ranking":
            total += float(F.binary_cross_entropy_with_logits(out.double(), label.double(),
                                                              reduction="sum"))
        else:
            total += float(F.cross_entropy(out.double(), label.long(), reduction="sum"))
    model.train()
    return total / max(len(data), 1)


# --- evaluation ----------------------------------------------------------------------------
@torch.inference_mode()
def predict(model: nn.Module, data: Arrays, task: str, batch_size: int = 4096,
            device: torch.device | None = None) -> np.ndarray:
    """Ranking: click probabilities (float64). Retrieval / next_item: the rank of the clicked
    item among all catalogue items (0 = top; ties count against it), int64."""
    device = device or torch.device("cpu")
    model.eval()
    out = []
    for i in range(0, len(data), batch_size):
        dense = torch.from_numpy(data.dense[i:i + batch_size]).to(device)
        sparse = torch.from_numpy(data.sparse[i:i + batch_size]).to(device)
        scores = model(dense, sparse)
        if task == "ranking":
            out.append(torch.sigmoid(scores).double().cpu().numpy())
            continue
        target = torch.from_numpy(data.label[i:i + batch_size]).to(device).long()
        own = scores.gather(1, target[:, None])
        out.append(((scores >= own).sum(1) - 1).cpu().numpy().astype(np.int64))
    return np.concatenate(out) if out else np.zeros(0)


def hit_name(task: str, k: int) -> str:
    return f"{'recall' if task == 'retrieval' else 'hr'}@{k}"


def rank_metrics(task: str, ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per-row Recall@K (HR@K) and NDCG@K from the clicked item's rank (one relevant item:
    NDCG@K = 1/log2(rank + 2) when it is in the top K)."""
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = ranks < k
        out[hit_name(task, k)] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    return out


def group_ndcg(groups: np.ndarray, label: np.ndarray, probs: np.ndarray,
               k: int) -> np.ndarray:
    """NDCG@k of each query/session list with at least one click and two rows (rows ranked by
    the model's probability; ties broken by row order, the same for every model)."""
    order = np.lexsort((np.arange(len(groups)), -probs, groups))
    g, y = groups[order], label[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    pos = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    gain = np.where(pos < k, y / np.log2(pos + 2.0), 0.0)
    dcg = np.add.reduceat(gain, starts)
    clicks = np.add.reduceat(y, starts).astype(np.int64)
    sizes = np.diff(np.r_[starts, len(g)])
    discounts = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))
    ideal = discounts[np.minimum(np.minimum(clicks, sizes), k) - 1]
    keep = (clicks > 0) & (sizes > 1)
    return dcg[keep] / ideal[keep]


def _mean_estimate(values: np.ndarray) -> Estimate:
    mean = float(values.mean()) if len(values) else float("nan")
    half = normal_quantile(0.975) * float(values.std(ddof=1)) / math.sqrt(len(values)) \
        if len(values) > 1 else float("nan")
    return Estimate(value=mean, ci_low=mean - half, ci_high=mean + half)


def segment_rows(data: Arrays) -> dict[str, np.ndarray]:
    """'COLUMN=VALUE' -> boolean row mask, for every segment value."""
    out: dict[str, np.ndarray] = {}
    for column, values in data.segments.items():
        distinct = np.unique(values)
        if len(distinct) > MAX_SEGMENT_VALUES:
            raise ValueError(f"segment column {column!r} has {len(distinct)} values (at most "
                             f"{MAX_SEGMENT_VALUES}): it is not a segment; remove it from "
                             "spec.segments")
        for v in distinct:
            out[f"{column}={v}"] = values == v
    return out


def quality(task: str, data: Arrays, pred: np.ndarray,
            ks: tuple[int, ...] = DEFAULT_KS) -> tuple[dict[str, Estimate], float | None]:
    """Every quality metric of one model's predictions, with 95% intervals (and the logloss,
    ranking only)."""
    out: dict[str, Estimate] = {}
    if task == "ranking":
        value, low, high = auc_with_ci(data.label, pred)
        out["auc"] = Estimate(value=value, ci_low=low, ci_high=high)
        if data.groups is not None:
            for k in ks:
                out[f"ndcg@{k}"] = _mean_estimate(group_ndcg(data.groups, data.label, pred, k))
        for name, rows in segment_rows(data).items():
            y = data.label[rows]
            if 0 < y.sum() < len(y):  # AUC needs both classes
                value, low, high = auc_with_ci(y, pred[rows])
                out[f"auc[{name}]"] = Estimate(value=value, ci_low=low, ci_high=high)
        return out, logloss(data.label, pred)
    per_row = rank_metrics(task, pred, ks)
    segments = segment_rows(data)
    for metric, values in per_row.items():
        out[metric] = _mean_estimate(values)
        for name, rows in segments.items():
            if rows.sum() > 1:
                out[f"{metric}[{name}]"] = _mean_estimate(values[rows])
    return out, None


def main_metric(task: str) -> str:
    return MAIN_METRIC[task]


def scalar_quality(task: str, data: Arrays, pred: np.ndarray) -> float:
    """The main metric's value (calibration's sensitivity, NAS fitness)."""
    if task == "ranking":
        from tasks.metrics import auc

        return auc(data.label, pred)
    return float(rank_metrics(task, pred, (int(main_metric(task).split("@")[1]),))[
        main_metric(task)].mean())


def paired_deltas(task: str, data: Arrays, base: np.ndarray, cand: np.ndarray,
                  ks: tuple[int, ...] = DEFAULT_KS,
                  confidence: float = 0.95) -> tuple[PairedDelta, ...]:
    """Candidate vs baseline on the same rows, for every metric `quality` reports. A loss is
    baseline - candidate for higher-is-better metrics (a rise for logloss); its one-sided upper
    `confidence` bound is paired DeLong for AUC, the paired bootstrap for the others."""
    out: list[PairedDelta] = []

    def boot(metric: str, b: np.ndarray, c: np.ndarray) -> None:
        if len(b) < 2:
            return
        out.append(PairedDelta(metric=metric, delta=float(c.mean() - b.mean()),
                               loss_ci_high=paired_bootstrap_upper(b - c, confidence),
                               baseline=float(b.mean())))

    if task == "ranking":
        y = data.label
        base_auc, delta, high = paired_auc_loss(y, base, cand, confidence)
        out.append(PairedDelta(metric="auc", delta=delta, loss_ci_high=high, baseline=base_auc))
        b_rows, c_rows = row_logloss(y, base), row_logloss(y, cand)
        out.append(PairedDelta(metric="logloss", delta=float(c_rows.mean() - b_rows.mean()),
                               loss_ci_high=paired_bootstrap_upper(c_rows - b_rows, confidence),
                               baseline=float(b_rows.mean())))
        if data.groups is not None:
            for k in ks:
                boot(f"ndcg@{k}", group_ndcg(data.groups, y, base, k),
                     group_ndcg(data.groups, y, cand, k))
        for name, rows in segment_rows(data).items():
            if 0 < y[rows].sum() < rows.sum():
                base_auc, delta, high = paired_auc_loss(y[rows], base[rows], cand[rows],
                                                        confidence)
                out.append(PairedDelta(metric=f"auc[{name}]", delta=delta, loss_ci_high=high,
                                       baseline=base_auc))
        return tuple(out)
    b_metrics, c_metrics = rank_metrics(task, base, ks), rank_metrics(task, cand, ks)
    segments = segment_rows(data)
    for metric in b_metrics:
        boot(metric, b_metrics[metric], c_metrics[metric])
        for name, rows in segments.items():
            boot(f"{metric}[{name}]", b_metrics[metric][rows], c_metrics[metric][rows])
    return tuple(out)
