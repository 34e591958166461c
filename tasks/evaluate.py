"""Evaluation: predictions, quality with confidence intervals, and measured size and latency."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from tasks.data import Arrays
from tasks.determinism import THREADS, fixed_threads
from tasks.protocol import QuantizedWeight, SparseWeight, problem_kind
from tasks.quality import main_metric, quality
from tasks.types import DEFAULT_KS, Latency, LatencyRatio, Metrics

LATENCY_BATCHES = (1, 512)


def device_label(dev: torch.device) -> str:
    """What a latency was measured on, as a report names it: `cuda: NVIDIA H200` or
    `cpu: 1 thread of AMD EPYC 7B13` (timing on CPU uses one intra-op thread)."""
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return f"cpu: 1 thread of {cpu_model()}"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown"


@torch.inference_mode()
def predict(model: nn.Module, data: Arrays, batch_size: int = 4096,
            device: torch.device | None = None) -> np.ndarray:
    """What the metrics read, by the model's problem kind (from its spec): ranking -> click
    probabilities (float64); retrieval / next_item -> the rank of the clicked item among all
    catalogue items (0 = top; ties count against it), int64.

    On `tasks.determinism.THREADS` intra-op threads, so the bits do not depend on the process
    (a partial last batch may otherwise take another matmul kernel)."""
    kind = problem_kind(model)
    device = device or torch.device("cpu")
    model.eval()
    out = []
    with fixed_threads(THREADS):
        for i in range(0, len(data), batch_size):
            dense = torch.from_numpy(data.dense[i:i + batch_size]).to(device)
            sparse = torch.from_numpy(data.sparse[i:i + batch_size]).to(device)
            scores = model(dense, sparse)
            if kind == "ranking":
                out.append(torch.sigmoid(scores).double().cpu().numpy())
                continue
            target = torch.from_numpy(data.label[i:i + batch_size]).to(device).long()
            own = scores.gather(1, target[:, None])
            out.append(((scores >= own).sum(1) - 1).cpu().numpy().astype(np.int64))
    return np.concatenate(out) if out else np.zeros(0)


@torch.inference_mode()
def predict_logits(model: nn.Module, data: Arrays, batch_size: int = 8192) -> np.ndarray:
    """Logits for every row, float32, computed on CPU on `THREADS` threads (teacher outputs
    for distillation: training reads them, so their bits must not depend on the process)."""
    model.eval()
    with fixed_threads(THREADS):
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
    with fixed_threads(1):
        return _timed(models, data, batch_sizes, rounds, iters, warmup)


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
                                  p99_ms=float(np.percentile(t, 99)),
                                  device=device_label(torch.device("cpu"))))
    return [tuple(lat) for lat in out]


def latency_ratios(reference: nn.Module, models: list[nn.Module], data: Arrays,
                   batch_sizes: tuple[int, ...] = LATENCY_BATCHES, iters: int = 25,
                   min_rounds: int = 10, max_rounds: int = 60, width: float = 0.10,
                   max_seconds: float = 90.0, warmup: int = 10, resamples: int = 200,
                   clock: Callable[[], float] = time.perf_counter,
                   device: torch.device | None = None,
                   ) -> tuple[tuple[Latency, ...], list[tuple[Latency, ...]],
                              list[tuple[LatencyRatio, ...]]]:
    """The reference's and every model's latency, timed side by side on `device` (CPU, on one
    intra-op thread, by default), and each model's latency ratio (reference p99 / model p99)
    with a 95% interval. On a CUDA device the models and inputs are moved there and every
    call is timed to its end (`torch.cuda.synchronize`): what the GPU kernels cost, 2:4
    sparse tensor cores and half precision included, not their CPU fallbacks.

    Rounds interleave all models (each runs `iters` timed calls per round, and each round
    starts at the next model, so no model is always timed right after a switch), so a busy
    moment slows them alike. The interval is a bootstrap over rounds (resampling whole rounds keeps
    each round's shared conditions paired). Rounds are added, `min_rounds` at a time, until
    every interval's width is at most `width` times its ratio, or `max_rounds` / `max_seconds`
    is reached; `LatencyRatio.rounds` says how many it took (`clock` is injectable so the
    statistics can be tested on scripted times). Run it while nothing else runs on
    the machine's cores: the flow times all candidates in one task that holds its node's CPUs
    after every other stage is done.
    """
    device = device or torch.device("cpu")
    if device.type == "cuda":
        models = [m.to(device) for m in models]
        reference = reference.to(device)
    with fixed_threads(1):
        return _ratios([reference, *models], data, batch_sizes, iters, min_rounds, max_rounds,
                       width, max_seconds, warmup, resamples, clock, device)


@torch.inference_mode()
def _ratios(models: list[nn.Module], data: Arrays, batch_sizes: tuple[int, ...], iters: int,
            min_rounds: int, max_rounds: int, width: float, max_seconds: float, warmup: int,
            resamples: int, clock: Callable[[], float], device: torch.device,
            ) -> tuple[tuple[Latency, ...], list[tuple[Latency, ...]], list[tuple[LatencyRatio, ...]]]:
    rng = np.random.default_rng(0)
    lat: list[list[Latency]] = [[] for _ in models]
    ratios: list[list[LatencyRatio]] = [[] for _ in models[1:]]
    # a CUDA call returns once its kernels are queued: time each to its end
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    label = device_label(device)
    start = clock()
    for bs in batch_sizes:
        idx = rng.integers(0, len(data), bs)
        dense = torch.from_numpy(data.dense[idx]).to(device)
        sparse = torch.from_numpy(data.sparse[idx]).to(device)
        for m in models:
            m.eval()
            for _ in range(warmup):
                m(dense, sparse)
        sync()
        rounds: list[np.ndarray] = []  # [models, iters] per round
        while True:
            for _ in range(min_rounds):
                block = np.empty((len(models), iters))
                # each round starts at another model: the first one timed after a switch
                # runs slower (measured: an identical copy timed first came out 1.2x slower)
                first = len(rounds) % len(models)
                for i in (*range(first, len(models)), *range(first)):
                    m = models[i]
                    for j in range(iters):
                        t0 = clock()
                        m(dense, sparse)
                        sync()
                        block[i, j] = (clock() - t0) * 1e3
                rounds.append(block)
            times = np.stack(rounds, 1)  # [models, rounds, iters]
            value, low, high = _ratio_interval(times, resamples, rng)
            narrow = bool(np.all(high - low <= width * value))
            if narrow or len(rounds) >= max_rounds or clock() - start > max_seconds:
                break
        flat = times.reshape(len(models), -1)
        for i in range(len(models)):
            lat[i].append(Latency(batch_size=bs, p50_ms=float(np.percentile(flat[i], 50)),
                                  p99_ms=float(np.percentile(flat[i], 99)), device=label))
        for i in range(len(models) - 1):
            ratios[i].append(LatencyRatio(batch_size=bs, value=float(value[i]),
                                          ci_low=float(low[i]), ci_high=float(high[i]),
                                          rounds=len(rounds), device=label))
    return tuple(lat[0]), [tuple(x) for x in lat[1:]], [tuple(r) for r in ratios]


def _ratio_interval(times: np.ndarray, resamples: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """times [models, rounds, iters], model 0 the reference: each other model's p99 ratio
    and its 95% bootstrap interval over rounds."""
    n_models, n_rounds, _ = times.shape

    def ratio(rows: np.ndarray) -> np.ndarray:
        p99 = np.percentile(times[:, rows].reshape(n_models, -1), 99, axis=1)
        return p99[0] / p99[1:]

    value = ratio(np.arange(n_rounds))
    boot = np.stack([ratio(rng.integers(0, n_rounds, n_rounds)) for _ in range(resamples)])
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    return value, low, high


def stored_elements(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values())


def _leaf_tensors_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def embedding_bytes(model: nn.Module) -> int:
    """Stored bytes of the embedding tables and item index (whatever form they now have): the
    model's children named `embeddings` and `index`, as the built-in families name them."""
    children = dict(model.named_children())
    return sum(_leaf_tensors_bytes(children[name]) for name in ("embeddings", "index")
               if name in children)


@torch.inference_mode()
def dense_flops(model: nn.Module) -> int:
    """Multiply-adds per example in Linear-like layers (counted from their weight shapes)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        elif isinstance(m, SparseWeight):  # pruned entries cost nothing
            total += int((m.dense_weight() != 0).sum())
        elif isinstance(m, QuantizedWeight):
            total += m.dequantized_weight().numel()
    return total


def evaluate(model: nn.Module, test: Arrays, size_bytes: int,
             reference: nn.Module | None = None, ks: tuple[int, ...] = DEFAULT_KS,
             timed: bool = True) -> tuple[Metrics, np.ndarray, tuple[Latency, ...] | None]:
    """Metrics of `model` on `test` (size = the serialized artifact's bytes), its predictions
    (probabilities or ranks, see `predict`), and - when a `reference` model is given - the
    reference's latency timed side by side with the model's (for an honest latency ratio).
    `timed=False` leaves latency out (the flow times every candidate later, in one quiet
    task: `latency_ratios`)."""
    kind = problem_kind(model)
    pred = predict(model, test)
    estimates, ll = quality(kind, test, pred, ks)
    if not timed:
        return Metrics(main=main_metric(kind), quality=estimates, logloss=ll,
                       rows=len(test), size_bytes=size_bytes, params=stored_elements(model),
                       latency=()), pred, None
    lat = measure_latency([model] if reference is None else [model, reference], test)
    metrics = Metrics(main=main_metric(kind), quality=estimates, logloss=ll,
                      rows=len(test), size_bytes=size_bytes, params=stored_elements(model),
                      latency=lat[0])
    return metrics, pred, (lat[1] if reference is not None else None)
