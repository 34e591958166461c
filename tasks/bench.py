"""Benchmarks: baseline and candidates on the same data, in one process, side by side.

Latency is timed in interleaved rounds (baseline, candidate 1, candidate 2, …, repeat) so a
slow moment of a shared machine hits every model alike; ratios are taken within the run.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

from torch import nn

from tasks.artifacts import serialize_model
from tasks.data import to_arrays
from tasks.evaluate import (
    dense_flops,
    embedding_bytes,
    latency_ratios,
    predict,
    predict_logits,
    stored_elements,
)
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.objectives import main_metric, paired_deltas, scalar_quality
from tasks.stages import StageContext, apply_stage, calibrate
from tasks.train import train
from tasks.types import (
    CalibrateConfig,
    DistillConfig,
    DlrmSpec,
    FactorizeConfig,
    MixedPrecision,
    ModelSpec,
    PruneConfig,
    QuantizeConfig,
    SasrecSpec,
    StageConfig,
    TrainConfig,
    TwoTowerSpec,
)

BUDGET = 0.001  # relative loss of the main metric the suites judge "passed" against (upper
# 95% bound): AUC for the ranker, Recall@50 for two-tower, NDCG@10 for SASRec

Plan = StageConfig | tuple[StageConfig, ...]  # one stage, or a chain applied in order

# TT cores start from a truncated TT-SVD far from the table: they need more fine-tuning
_TT_FINETUNE = {"finetune_epochs": 3, "finetune_lr": 3e-3}
_HALF = DlrmSpec(embedding_dim=32, bottom_mlp=(128, 32), top_mlp=(128, 64))  # < 1/2 params
_QUARTER = DlrmSpec(embedding_dim=16, bottom_mlp=(64, 16), top_mlp=(128, 64))  # < 1/4

SUITES: dict[str, tuple[Plan, ...]] = {
    "quantize": (
        QuantizeConfig(linear="dynamic_int8", embeddings="none"),
        QuantizeConfig(linear="static_int8", embeddings="none"),
        QuantizeConfig(linear="static_int8", embeddings="none", activation_range="entropy"),
        QuantizeConfig(linear="int8_weight_only", embeddings="none"),
        QuantizeConfig(linear="int4_weight_only", embeddings="none"),
        QuantizeConfig(linear="int4_weight_only", group_size=32, embeddings="none",
                       ),
        QuantizeConfig(linear="fp16", embeddings="fp16"),
        QuantizeConfig(linear="bf16", embeddings="bf16"),
        QuantizeConfig(linear="none", embeddings="rowwise_int8"),
        QuantizeConfig(linear="none", embeddings="rowwise_int4", row_range="minmax"),
        QuantizeConfig(linear="none", embeddings="rowwise_int4"),
        QuantizeConfig(linear="none", embeddings="rowwise_int2"),
        QuantizeConfig(linear="dynamic_int8", embeddings="rowwise_int8"),
        QuantizeConfig(linear="dynamic_int8", embeddings="rowwise_int4"),
        QuantizeConfig(mixed_precision=MixedPrecision()),
    ),
    "prune": (
        PruneConfig(method="structured", sparsity=0.5),
        PruneConfig(method="structured", sparsity=0.75),
        PruneConfig(method="structured", sparsity=0.75, steps=3),
        PruneConfig(method="magnitude", sparsity=0.8),
        PruneConfig(method="magnitude", sparsity=0.8, steps=3),
        (PruneConfig(method="structured", sparsity=0.5), PruneConfig(method="magnitude")),
        PruneConfig(method="embedding_rows", sparsity=0.5),
        (PruneConfig(method="embedding_rows", sparsity=0.5),
         QuantizeConfig(embeddings="rowwise_int4")),
    ),
    "factorize": (
        FactorizeConfig(target="embeddings", rank=16),
        FactorizeConfig(target="linear", energy=0.9),
        FactorizeConfig(target="tt_embeddings", rank=32, **_TT_FINETUNE),
        FactorizeConfig(target="tt_embeddings", rank=16, **_TT_FINETUNE),
        FactorizeConfig(target="tt_embeddings", rank=16, finetune_epochs=8, finetune_lr=3e-3),
        (FactorizeConfig(target="embeddings", rank=16), QuantizeConfig(embeddings="rowwise_int4")),
        (FactorizeConfig(target="tt_embeddings", rank=32, **_TT_FINETUNE), QuantizeConfig()),
        (FactorizeConfig(target="tt_embeddings", rank=32, **_TT_FINETUNE),
         QuantizeConfig(linear="int8_weight_only")),
        (FactorizeConfig(target="tt_embeddings", rank=16, **_TT_FINETUNE), QuantizeConfig()),
    ),
    "distill": (
        DistillConfig(student=_HALF),
        DistillConfig(student=_QUARTER),
        DistillConfig(student=_QUARTER, temperature=2.0),
        DistillConfig(student=_QUARTER, hint_weight=0.5),
        DistillConfig(student=_QUARTER, listwise_weight=0.5),
        DistillConfig(student=_QUARTER, temperature=2.0, hint_weight=0.5),
        (DistillConfig(student=_HALF), QuantizeConfig(embeddings="rowwise_int4")),
        (DistillConfig(student=_QUARTER, temperature=2.0),
         QuantizeConfig(linear="int8_weight_only")),
        (DistillConfig(student=_QUARTER, temperature=2.0),
         QuantizeConfig(embeddings="rowwise_int4")),
    ),
    # one run per family (docs/families.md): the ranker's best plans of each stage kind ...
    "dlrm": (
        QuantizeConfig(linear="dynamic_int8", embeddings="rowwise_int8"),
        QuantizeConfig(linear="int8_weight_only", embeddings="rowwise_int4"),
        QuantizeConfig(mixed_precision=MixedPrecision()),
        PruneConfig(method="structured", sparsity=0.5),
        FactorizeConfig(target="tt_embeddings", rank=32, **_TT_FINETUNE),
        (FactorizeConfig(target="tt_embeddings", rank=32, **_TT_FINETUNE),
         QuantizeConfig(linear="int8_weight_only")),
        DistillConfig(student=_HALF),
    ),
    # ... and the other families, each on its own baseline
    "two_tower": (
        QuantizeConfig(linear="none", embeddings="rowwise_int8"),
        QuantizeConfig(linear="dynamic_int8", embeddings="rowwise_int8"),
        QuantizeConfig(linear="int8_weight_only", embeddings="rowwise_int8"),
        QuantizeConfig(linear="int8_weight_only", embeddings="rowwise_int4"),
        PruneConfig(method="structured", sparsity=0.5),
        FactorizeConfig(target="embeddings", rank=16),
        (FactorizeConfig(target="tt_embeddings", rank=32, **_TT_FINETUNE),
         QuantizeConfig(linear="int8_weight_only", embeddings="rowwise_int8")),
        DistillConfig(student=TwoTowerSpec(embedding_dim=32, tower_mlp=(64,))),
        (DistillConfig(student=TwoTowerSpec(embedding_dim=32, tower_mlp=(64,))),
         QuantizeConfig(linear="int8_weight_only", embeddings="rowwise_int8")),
    ),
    "sasrec": (
        QuantizeConfig(linear="dynamic_int8", embeddings="none"),
        QuantizeConfig(linear="int8_weight_only", embeddings="rowwise_int8"),
        QuantizeConfig(linear="int8_weight_only", embeddings="rowwise_int4"),
        PruneConfig(method="structured", sparsity=0.5),
        FactorizeConfig(target="linear", rank=16),
        FactorizeConfig(target="tt_embeddings", rank=32, **_TT_FINETUNE),
        DistillConfig(student=SasrecSpec(layers=1, heads=1)),
        (DistillConfig(student=SasrecSpec(layers=1, heads=1)),
         QuantizeConfig(linear="int8_weight_only", embeddings="rowwise_int8")),
    ),
}
SUITE_MODELS: dict[str, ModelSpec] = {
    "two_tower": TwoTowerSpec(), "sasrec": SasrecSpec()}


def _stages(plan: Plan) -> tuple[StageConfig, ...]:
    return plan if isinstance(plan, tuple) else (plan,)


def plan_label(plan: Plan) -> str:
    return " -> ".join(stage.label() for stage in _stages(plan))


def run_suite(suite: str, size: str, seed: int = 0, batch_size: int = 512,
              log: Callable[[str], None] = print, data_seed: int = 0,
              timing_seconds: float = 90.0) -> list[dict[str, object]]:
    """One row per candidate of `suite` (leaderboard columns + the config); the latency
    timing of all candidates takes at most `timing_seconds` (the flow's default).

    `seed` is the training seed (init, shuffling); the data stays the same (`data_seed`), so
    rows of several seeds show the spread that training alone causes.
    """
    if suite not in SUITES:
        raise ValueError(f"--suite must be one of {sorted(SUITES)} (got {suite!r})")
    tables, data_spec = generate(size, data_seed)
    spec = resolve(SUITE_MODELS.get(suite, DlrmSpec()), data_spec)
    task, width = spec.task_kind(), spec.history_width()
    train_arrays, test = (to_arrays(tables[s], data_spec, task, width) for s in ("train", "test"))
    valid = to_arrays(tables["valid"], data_spec, task, width)
    t0 = time.perf_counter()
    baseline = train(build(spec, seed), train_arrays, TrainConfig(seed=seed), valid=valid)
    log(f"baseline trained in {time.perf_counter() - t0:.0f}s")
    base_bytes = len(serialize_model(baseline, spec))
    base_pred = predict(baseline, test)
    configs = SUITES[suite]
    cal = calibrate(baseline, CalibrateConfig(), StageContext(calibration=lambda: valid)) \
        if any(st.needs_calibration() for plan in configs for st in _stages(plan)) else None
    ctx = StageContext(seed=seed, calibration=lambda: valid, train_data=lambda: train_arrays,
                       activations=(lambda: cal.activations) if cal else None,
                       sensitivity=(lambda: cal.sensitivity) if cal else None,
                       max_relative_loss=BUDGET)
    # the baseline's outputs on the train rows: computed once, for every first stage to reuse
    first = dataclasses.replace(ctx, spec=spec, teacher_logits=functools.cache(
        lambda: predict_logits(baseline, train_arrays)) if task == "ranking" else None)
    candidates = []
    built: dict[tuple[str, ...], nn.Module] = {}  # a prefix shared by plans is built once
    for plan in configs:
        t0 = time.perf_counter()
        model, prefix = baseline, ()
        for k, stage in enumerate(_stages(plan)):
            prefix = (*prefix, stage.model_dump_json())
            if prefix not in built:
                built[prefix] = apply_stage(model, stage, first if k == 0 else dataclasses.replace(
                    ctx, spec=getattr(model, "spec", spec)))
            model = built[prefix]
        candidates.append(model)
        log(f"built {plan_label(plan)} in {time.perf_counter() - t0:.0f}s")
    # the flow's timing, side by side, rounds until each ratio's interval is narrow; a
    # retrieval forward scores the whole catalogue (tens of ms): fewer calls per round
    base_lat, lats, ratios = latency_ratios(baseline, candidates, test, batch_sizes=(batch_size,),
                                            iters=25 if task == "ranking" else 10,
                                            max_seconds=timing_seconds)
    p99 = [base_lat[0].p99_ms, *(lat[0].p99_ms for lat in lats)]
    metric = main_metric(task)
    rows: list[dict[str, object]] = []
    for cfg, model, cand_p99, ratio in zip(configs, candidates, p99[1:], ratios):
        pred = predict(model, test)
        nbytes = len(serialize_model(model, getattr(model, "spec", spec)))
        deltas = {d.metric: d for d in paired_deltas(task, test, base_pred, pred)}
        main = deltas[metric]
        rel_high = main.loss_ci_high / main.baseline
        rows.append({
            "suite": suite, "size": size, "seed": seed, "candidate": plan_label(cfg),
            "family": spec.family, "config": [st.model_dump(mode="json") for st in _stages(cfg)],
            "plan": plan_label(cfg), "size_bytes": nbytes,
            "embedding_bytes": embedding_bytes(model), "dense_flops": dense_flops(model),
            "baseline_embedding_bytes": embedding_bytes(baseline),
            "baseline_dense_flops": dense_flops(baseline), "params": stored_elements(model),
            "baseline_params": stored_elements(baseline),
            "baseline_bytes": base_bytes, "size_ratio": base_bytes / nbytes,
            "metric": metric, "quality": scalar_quality(task, test, pred),
            "baseline_quality": main.baseline, "delta": main.delta,
            "loss_ci_high": main.loss_ci_high, "relative_loss_ci_high": rel_high,
            "logloss_delta": deltas["logloss"].delta if "logloss" in deltas else None,
            "p99_ms_bs512": cand_p99, "baseline_p99_ms_bs512": p99[0],
            "latency_ratio": ratio[0].value, "latency_ratio_low": ratio[0].ci_low,
            "latency_ratio_high": ratio[0].ci_high, "latency_rounds": ratio[0].rounds,
            "passed": rel_high <= BUDGET,
            "reasons": [] if rel_high <= BUDGET else [
                f"{metric}: relative loss upper bound {rel_high:.5f} > budget {BUDGET}"],
            "bayes_auc": data_spec.bayes_auc, "test_rows": len(test),
        })
        log(f"{plan_label(cfg):48s} size {base_bytes / nbytes:5.2f}x  {metric} "
            f"{main.delta:+.5f} (rel loss<= {rel_high:.5f})  p99 {p99[0] / cand_p99:4.2f}x")
    return rows
