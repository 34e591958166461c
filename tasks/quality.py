"""What each problem kind is measured by (DESIGN §8, §12), from a model's predictions
(`tasks.evaluate.predict`: click probabilities for ranking, the clicked item's rank for
retrieval and next_item). Pure numpy: no model, no torch.

ranking    AUC (DeLong), logloss, NDCG@K over the rows of each query/session (the dataset's
           query_id), AUC per segment value.
retrieval  Recall@K and NDCG@K of the clicked item by exact top-K over the whole catalogue, per
           row, overall and per segment value.
next_item  as retrieval, HR@K instead of Recall@K (one relevant item: they coincide).
"""

from __future__ import annotations

import math

import numpy as np

from tasks.data import Arrays
from tasks.metrics import (
    auc,
    auc_with_ci,
    logloss,
    normal_quantile,
    paired_auc_loss,
    paired_bootstrap_upper,
    row_logloss,
)
from tasks.types import DEFAULT_KS, MAIN_METRIC, Estimate, PairedDelta, ProblemKind

MAX_SEGMENT_VALUES = 50


def hit_name(kind: ProblemKind, k: int) -> str:
    return f"{'recall' if kind == 'retrieval' else 'hr'}@{k}"


def rank_metrics(kind: ProblemKind, ranks: np.ndarray,
                 ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per-row Recall@K (HR@K) and NDCG@K from the clicked item's rank (one relevant item:
    NDCG@K = 1/log2(rank + 2) when it is in the top K)."""
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = ranks < k
        out[hit_name(kind, k)] = hit.astype(np.float64)
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


def quality(kind: ProblemKind, data: Arrays, pred: np.ndarray,
            ks: tuple[int, ...] = DEFAULT_KS) -> tuple[dict[str, Estimate], float | None]:
    """Every quality metric of one model's predictions, with 95% intervals (and the logloss,
    ranking only)."""
    out: dict[str, Estimate] = {}
    if kind == "ranking":
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
    per_row = rank_metrics(kind, pred, ks)
    segments = segment_rows(data)
    for metric, values in per_row.items():
        out[metric] = _mean_estimate(values)
        for name, rows in segments.items():
            if rows.sum() > 1:
                out[f"{metric}[{name}]"] = _mean_estimate(values[rows])
    return out, None


def main_metric(kind: ProblemKind) -> str:
    return MAIN_METRIC[kind]


def scalar_quality(kind: ProblemKind, data: Arrays, pred: np.ndarray) -> float:
    """The main metric's value (calibration's sensitivity, NAS fitness)."""
    if kind == "ranking":
        return auc(data.label, pred)
    return float(rank_metrics(kind, pred, (int(main_metric(kind).split("@")[1]),))[
        main_metric(kind)].mean())


def paired_deltas(kind: ProblemKind, data: Arrays, base: np.ndarray, cand: np.ndarray,
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

    if kind == "ranking":
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
    b_metrics, c_metrics = rank_metrics(kind, base, ks), rank_metrics(kind, cand, ks)
    segments = segment_rows(data)
    for metric in b_metrics:
        boot(metric, b_metrics[metric], c_metrics[metric])
        for name, rows in segments.items():
            boot(f"{metric}[{name}]", b_metrics[metric][rows], c_metrics[metric][rows])
    return tuple(out)
