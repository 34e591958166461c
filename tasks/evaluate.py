"""Evaluation: quality with confidence intervals, and measured size and latency."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from tasks.data import Arrays
from tasks.metrics import (
    auc_with_ci,
    logloss,
    paired_auc_loss,
    paired_bootstrap_upper,
    row_logloss,
)
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
def predict_logits(model: nn.Module, data: Arrays, batch_size: int = 8192) -> np.ndarray:
    """Logits for every row, float32, computed on CPU (teacher outputs for distillation)."""
    model.eval()
    out = [model(torch.from_numpy(data.dense[i:i + batch_size]),
                 torch.from_numpy(data.sparse[i:i + batch_size])).float().numpy()
           for i in range(0, len(data), batch_size)]
    return np.concatenate(out)


def measure_latency(models: list[nn.Module], data: Arrays,
                    batch_sizes: tuple[int, ...] = LATENCY_BATCHES, rounds: int = 20,
                    iters: int = 25, warmup: int = 10) -> list[tuple[Latency, ...]]:
    """CPU forward latency of each model, timed side by side on one intra-op thread (eager).

    One thread, as a serving replica pinned to a core runs; on a shared 2-core machine it also
    keeps thread wake-ups out of p99. Rounds interleave the models, so a busy moment slows
    them all alike and their ratio stays honest. The thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timed(models, data, batch_sizes, rounds, iters, warmup)
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def _timed(models: list[nn.Module], data: Arrays, batch_sizes: tuple[int, ...], rounds: int,
           iters: int, warmup: int) -> list[tuple[Latency, ...]]:
    rng = np.random.default_rng(0)
    out: list[list[Latency]] = [[] for _ in models]
    for bs in batch_sizes:
        idx = rng.integers(0, len(data), bs)
        dense, sparse = torch.from_numpy(data.dense[idx]), torch.from_numpy(data.sparse[idx])
        times: list[list[float]] = [[] for _ in models]
        for m in models:
            m.eval()
            for _ in range(warmup):
                m(dense, sparse)
        for _ in range(rounds):
            for i, m in enumerate(models):
                for _ in range(iters):
                    t0 = time.perf_counter()
                    m(dense, sparse)
                    times[i].append((time.perf_counter() - t0) * 1e3)
        for i, t in enumerate(times):
            out[i].append(Latency(batch_size=bs, p50_ms=float(np.percentile(t, 50)),
                                  p99_ms=float(np.percentile(t, 99))))
    return [tuple(lat) for lat in out]


def stored_elements(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values())


def _leaf_tensors_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def embedding_bytes(model: nn.Module) -> int:
    """Stored bytes of the embedding tables (whatever form they now have)."""
    tables = getattr(model, "embeddings", None)
    return _leaf_tensors_bytes(tables) if isinstance(tables, nn.Module) else 0


@torch.inference_mode()
def dense_flops(model: nn.Module) -> int:
    """Multiply-adds per example in Linear-like layers (counted from their weight shapes)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        elif hasattr(m, "dense_weight") or hasattr(m, "dequantized_weight"):
            w = m.dense_weight() if hasattr(m, "dense_weight") else m.dequantized_weight()
            total += int((w != 0).sum()) if hasattr(m, "dense_weight") else w.numel()
    return total


def evaluate(model: nn.Module, test: Arrays, size_bytes: int,
             reference: nn.Module | None = None,
             ) -> tuple[Metrics, np.ndarray, tuple[Latency, ...] | None]:
    """Metrics of `model` on `test` (size = the serialized artifact's bytes), its
    probabilities, and - when a `reference` model is given - the reference's latency timed
    side by side with the model's (for an honest latency ratio)."""
    probs = predict(model, test)
    value, low, high = auc_with_ci(test.label, probs)
    lat = measure_latency([model] if reference is None else [model, reference], test)
    metrics = Metrics(
        auc={"value": value, "ci_low": low, "ci_high": high},  # type: ignore[arg-type]
        logloss=logloss(test.label, probs), rows=len(test), size_bytes=size_bytes,
        params=stored_elements(model), latency=lat[0],
    )
    return metrics, probs, (lat[1] if reference is not None else None)


def paired_deltas(label: np.ndarray, base: np.ndarray, cand: np.ndarray,
                  confidence: float = 0.95) -> tuple[PairedDelta, ...]:
    """Candidate vs baseline on the same rows: AUC by paired DeLong, logloss by the paired
    bootstrap of the per-row loss difference (both one-sided upper `confidence` bounds)."""
    base_auc, delta, loss_high = paired_auc_loss(label, base, cand, confidence)
    base_rows, cand_rows = row_logloss(label, base), row_logloss(label, cand)
    base_ll = float(base_rows.mean())
    ll_delta = float(cand_rows.mean()) - base_ll
    ll_high = paired_bootstrap_upper(cand_rows - base_rows, confidence)
    return (
        PairedDelta(metric="auc", delta=delta, loss_ci_high=loss_high, baseline=base_auc),
        # lower logloss is better: a loss is an increase
        PairedDelta(metric="logloss", delta=ll_delta, loss_ci_high=ll_high, baseline=base_ll),
    )
