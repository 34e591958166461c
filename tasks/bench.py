"""Benchmarks: baseline and candidates on the same data, in one process, side by side.

Latency is timed in interleaved rounds (baseline, candidate 1, candidate 2, …, repeat) so a
slow moment of a shared machine hits every model alike; ratios are taken within the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from tasks.artifacts import serialize_model
from tasks.data import generate, to_arrays
from tasks.evaluate import paired_deltas, predict
from tasks.metrics import auc
from tasks.models import build, resolve
from tasks.stages import StageContext, apply_stage
from tasks.train import train
from tasks.types import ModelSpec, QuantizeConfig, StageConfig, TrainConfig

SUITES: dict[str, tuple[StageConfig, ...]] = {
    "quantize": (
        QuantizeConfig(linear="dynamic_int8", embeddings="none"),
        QuantizeConfig(linear="none", embeddings="rowwise_int8"),
        QuantizeConfig(linear="dynamic_int8", embeddings="rowwise_int8"),
    ),
}


@torch.inference_mode()
def interleaved_p99(models: list[nn.Module], dense: torch.Tensor, sparse: torch.Tensor,
                    rounds: int = 10, iters: int = 20) -> list[float]:
    times: list[list[float]] = [[] for _ in models]
    for m in models:  # warm-up (lazy packing, allocator)
        for _ in range(5):
            m(dense, sparse)
    for _ in range(rounds):
        for i, m in enumerate(models):
            for _ in range(iters):
                t0 = time.perf_counter()
                m(dense, sparse)
                times[i].append((time.perf_counter() - t0) * 1e3)
    return [float(np.percentile(t, 99)) for t in times]


def run_suite(suite: str, size: str, seed: int = 0, batch_size: int = 512,
              log: Callable[[str], None] = print) -> list[dict[str, object]]:
    """One row per candidate of `suite` (leaderboard columns + the config)."""
    if suite not in SUITES:
        raise ValueError(f"--suite must be one of {sorted(SUITES)} (got {suite!r})")
    torch.manual_seed(seed)
    tables, data_spec = generate(size, seed)
    spec = resolve(ModelSpec(), data_spec)
    train_arrays, test = to_arrays(tables["train"], data_spec), to_arrays(tables["test"], data_spec)
    t0 = time.perf_counter()
    baseline = train(build(spec, seed), train_arrays, TrainConfig(seed=seed),
                     valid=to_arrays(tables["valid"], data_spec))
    log(f"baseline trained in {time.perf_counter() - t0:.0f}s")
    base_bytes = len(serialize_model(baseline, spec))
    base_probs = predict(baseline, test)
    candidates = [apply_stage(baseline, cfg, StageContext(seed=seed)) for cfg in SUITES[suite]]
    idx = np.random.default_rng(0).integers(0, len(test), batch_size)
    p99 = interleaved_p99([baseline, *candidates], torch.from_numpy(test.dense[idx]),
                          torch.from_numpy(test.sparse[idx]))
    rows: list[dict[str, object]] = []
    for cfg, model, cand_p99 in zip(SUITES[suite], candidates, p99[1:]):
        probs = predict(model, test)
        nbytes = len(serialize_model(model, spec))
        auc_d, ll_d = paired_deltas(test.label, base_probs, probs)
        rows.append({
            "suite": suite, "size": size, "seed": seed, "candidate": cfg.label(),
            "config": cfg.model_dump(mode="json"), "plan": cfg.label(), "size_bytes": nbytes,
            "baseline_bytes": base_bytes, "size_ratio": base_bytes / nbytes,
            "auc": auc(test.label, probs), "baseline_auc": auc_d.baseline,
            "auc_delta": auc_d.delta, "auc_loss_ci_high": auc_d.loss_ci_high,
            "relative_auc_loss_ci_high": auc_d.loss_ci_high / auc_d.baseline,
            "logloss_delta": ll_d.delta, "p99_ms_bs512": cand_p99,
            "baseline_p99_ms_bs512": p99[0], "latency_ratio": p99[0] / cand_p99,
            "bayes_auc": data_spec.bayes_auc,
        })
        log(f"{cfg.label():45s} size {base_bytes / nbytes:5.2f}x  auc {auc_d.delta:+.5f} "
            f"(loss<= {auc_d.loss_ci_high:.5f})  p99 {p99[0] / cand_p99:4.2f}x")
    return rows
