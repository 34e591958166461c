"""Activation range observers: min/max, percentile, MSE-optimal and entropy (KL)-optimal.

All work from a histogram of the observed values (what the calibrate stage stores), so the
clipping range of a tensor can be recomputed from the table without the data.
"""

from __future__ import annotations

import numpy as np


def histogram(values: np.ndarray, bins: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1e-6
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return counts.astype(np.float64), edges


def percentile_range(values: np.ndarray, pct: float = 99.99) -> tuple[float, float]:
    return float(np.percentile(values, 100 - pct)), float(np.percentile(values, pct))


def _quant_error(counts: np.ndarray, centers: np.ndarray, lo: float, hi: float,
                 levels: int) -> float:
    scale = (hi - lo) / (levels - 1)
    q = np.clip(np.round((centers - lo) / scale), 0, levels - 1) * scale + lo
    return float((counts * (centers - q) ** 2).sum())


def mse_range(counts: np.ndarray, edges: np.ndarray, bits: int = 8,
              grid: int = 100) -> tuple[float, float]:
    """Clipping range minimising the expected squared quantization error (incl. clipping)."""
    centers = (edges[:-1] + edges[1:]) / 2
    lo, hi = float(edges[0]), float(edges[-1])
    best, best_err = (lo, hi), _quant_error(counts, centers, lo, hi, 2**bits)
    for frac in np.linspace(0.02, 1.0, grid):
        if lo < 0 < hi:  # keep zero inside: shrink both sides toward it
            cand = (lo * frac, hi * frac)
        else:
            mid = (lo + hi) / 2
            cand = (mid - (mid - lo) * frac, mid + (hi - mid) * frac)
        err = _quant_error(counts, centers, *cand, 2**bits)
        if err < best_err:
            best, best_err = cand, err
    return best


def entropy_range(counts: np.ndarray, edges: np.ndarray, bits: int = 8) -> tuple[float, float]:
    """TensorRT-style KL calibration: the symmetric threshold |t| whose 2^(bits-1)-level
    quantized distribution diverges least (KL) from the observed one."""
    centers = (edges[:-1] + edges[1:]) / 2
    absmax = float(max(abs(edges[0]), abs(edges[-1])))
    # fold into a histogram of |x|
    n = len(counts)
    abs_counts, abs_edges = np.histogram(np.abs(centers), bins=n, range=(0, absmax),
                                         weights=counts)
    levels = 2 ** (bits - 1)
    best_t, best_kl = absmax, np.inf
    for i in range(levels, n + 1, max(1, n // 256)):
        p = abs_counts[:i].copy()
        p[i - 1] += abs_counts[i:].sum()  # clipped mass lands in the last bin
        # quantize the first i bins into `levels` levels, then expand back
        chunks = np.array_split(np.arange(i), levels)
        q = np.zeros(i)
        for c in chunks:
            nonzero = abs_counts[c] > 0
            if nonzero.any():
                q[c[nonzero]] = abs_counts[c].sum() / nonzero.sum()
        p_sum, q_sum = p.sum(), q.sum()
        if p_sum == 0 or q_sum == 0:
            continue
        mask = p > 0
        kl = float((p[mask] / p_sum * np.log((p[mask] / p_sum) / np.maximum(q[mask] / q_sum,
                                                                              1e-12))).sum())
        if kl < best_kl:
            best_kl, best_t = kl, float(abs_edges[i])
    lo = -best_t if edges[0] < 0 else float(edges[0])
    return lo, best_t
