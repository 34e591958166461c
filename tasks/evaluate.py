"""Evaluation: quality with confidence intervals, and measured size and latency."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from tasks.data import Arrays
from tasks.metrics import auc_with_ci, logloss, paired_auc_loss
from tasks.types import Latency, Metrics, PairedDelta

LATENCY_BATCHES = (1, 512)


@torch.inference_mode()
def predict(model: nn.Module, data: Arrays, batch_size: int = 8192,
            device: torch.device | None = None) -> np.ndarray:
    """Click probabilities for every row, float64."""
    device = device or torch.device("cpu")
    model.eval()
    out = []
    for i in range(0, len(data), batch_size):
        dense = torch.from_numpy(data.dense[i:i + batch_size]).to(device)
        sparse = torch.from_numpy(data.sparse[i:i + batch_size]).to(device)
        out.append(torch.sigmoid(model(dense, sparse)).double().cpu().numpy())
    return np.concatenate(out)


@torch.inference_mode()
def measure_latency(model: nn.Module, data: Arrays, batch_sizes: tuple[int, ...] = LATENCY_BATCHES,
                    iters: int = 100, warmup: int = 10) -> tuple[Latency, ...]:
    """Wall-clock forward latency on CPU in this process's thread budget (eager mode)."""
    model.eval()
    results = []
    rng = np.random.default_rng(0)
    for bs in batch_sizes:
        idx = rng.integers(0, len(data), bs)
        dense, sparse = torch.from_numpy(data.dense[idx]), torch.from_numpy(data.sparse[idx])
        for _ in range(warmup):
            model(dense, sparse)
        times = np.empty(iters)
        for j in range(iters):
            t0 = time.perf_counter()
            model(dense, sparse)
            times[j] = (time.perf_counter() - t0) * 1e3
        results.append(Latency(batch_size=bs, p50_ms=float(np.percentile(times, 50)),
                               p99_ms=float(np.percentile(times, 99))))
    return tuple(results)


def stored_elements(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values())


def evaluate(model: nn.Module, test: Arrays, size_bytes: int,
             probs: np.ndarray | None = None) -> tuple[Metrics, np.ndarray]:
    """Metrics of `model` on `test` (size = the serialized artifact's bytes) and its probs."""
    probs = predict(model, test) if probs is None else probs
    value, low, high = auc_with_ci(test.label, probs)
    metrics = Metrics(
        auc={"value": value, "ci_low": low, "ci_high": high},  # type: ignore[arg-type]
        logloss=logloss(test.label, probs), rows=len(test), size_bytes=size_bytes,
        params=stored_elements(model), latency=measure_latency(model, test),
    )
    return metrics, probs


def paired_deltas(label: np.ndarray, base: np.ndarray, cand: np.ndarray,
                  confidence: float = 0.95) -> tuple[PairedDelta, ...]:
    """Candidate vs baseline on the same rows (AUC via paired DeLong; logloss as a point)."""
    base_auc, delta, loss_high = paired_auc_loss(label, base, cand, confidence)
    base_ll = logloss(label, base)
    ll_delta = logloss(label, cand) - base_ll
    return (
        PairedDelta(metric="auc", delta=delta, loss_ci_high=loss_high, baseline=base_auc),
        # lower logloss is better: a loss is an increase
        PairedDelta(metric="logloss", delta=ll_delta, loss_ci_high=ll_delta, baseline=base_ll),
    )
