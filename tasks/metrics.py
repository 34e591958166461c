"""Pure numpy metric math: AUC with DeLong variance (single and paired), log loss.

DeLong, DeLong & Clarke-Pearson (1988); the O(n log n) midrank form of Sun & Xu (2014).
"""

from __future__ import annotations

import math

import numpy as np


def _midranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = len(x)
    ranks = np.empty(n, dtype=np.float64)
    # ties share the mean of their 1-based positions
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [n]))
    mids = (starts + ends + 1) / 2.0
    ranks_sorted = np.repeat(mids, ends - starts)
    ranks[order] = ranks_sorted
    return ranks


def _structural(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong structural components for k score vectors (rows of `scores`)."""
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    if m == 0 or n == 0:
        raise ValueError(f"AUC needs both classes (positives={m}, negatives={n})")
    k = scores.shape[0]
    aucs = np.empty(k)
    v10 = np.empty((k, m))
    v01 = np.empty((k, n))
    for r in range(k):
        x, z = scores[r, pos], scores[r, ~pos]
        tx, tz, txz = _midranks(x), _midranks(z), _midranks(np.concatenate([x, z]))
        aucs[r] = (txz[:m].sum() - m * (m + 1) / 2.0) / (m * n)
        v10[r] = (txz[:m] - tx) / n
        v01[r] = 1.0 - (txz[m:] - tz) / m
    return aucs, v10, v01


def normal_quantile(confidence: float) -> float:
    """z such that P(Z <= z) = confidence."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(confidence)


def auc_with_ci(y: np.ndarray, p: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """AUC and a two-sided `confidence` DeLong interval."""
    aucs, v10, v01 = _structural(y, p[None, :])
    var = np.var(v10[0], ddof=1) / v10.shape[1] + np.var(v01[0], ddof=1) / v01.shape[1]
    half = normal_quantile(0.5 + confidence / 2) * math.sqrt(max(var, 0.0))
    return float(aucs[0]), float(aucs[0] - half), float(aucs[0] + half)


def auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(_structural(y, p[None, :])[0][0])


def paired_auc_loss(
    y: np.ndarray, p_base: np.ndarray, p_cand: np.ndarray, confidence: float = 0.95
) -> tuple[float, float, float]:
    """(baseline AUC, candidate - baseline, one-sided upper `confidence` bound of the loss).

    Paired DeLong: both models are scored on the same rows, so the variance of the difference
    subtracts their covariance - far tighter than two independent intervals.
    """
    aucs, v10, v01 = _structural(y, np.stack([p_base, p_cand]))
    s10, s01 = np.cov(v10), np.cov(v01)
    cov = s10 / v10.shape[1] + s01 / v01.shape[1]
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    loss = aucs[0] - aucs[1]
    upper = loss + normal_quantile(confidence) * math.sqrt(max(var, 0.0))
    return float(aucs[0]), float(aucs[1] - aucs[0]), float(upper)


def row_logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    q = np.clip(p.astype(np.float64), eps, 1 - eps)
    return -(y * np.log(q) + (1 - y) * np.log(1 - q))


def logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    return float(np.mean(row_logloss(y, p, eps)))


def paired_bootstrap_upper(diff: np.ndarray, confidence: float = 0.95, resamples: int = 1000,
                           seed: int = 0, chunk: int = 50) -> float:
    """One-sided upper `confidence` bound of mean(diff) by the paired percentile bootstrap:
    rows are resampled with replacement, the same rows for both models (`diff` is per-row
    candidate minus baseline), so their correlation is kept. Seeded: the same inputs give the
    same bound."""
    rng = np.random.default_rng(seed)
    n = len(diff)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        means[start:start + k] = diff[rng.integers(0, n, (k, n))].mean(axis=1)
    return float(np.quantile(means, confidence))
