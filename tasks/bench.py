"""Benchmarks: baseline and candidates on the same data, in one process, side by side.

Latency is timed in interleaved rounds (baseline, candidate 1, candidate 2, …, repeat) so a
slow moment of a shared machine hits every model alike; ratios are taken within the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from tasks.data import Arrays, to_arrays
from tasks.defaults import default_candidates
from tasks.evaluate import dense_flops, embedding_bytes, latency_ratios
from tasks.execute import Executed, Executor, LocalExecutor, run_plan, searches
from tasks.export import ExportError, serving_export
from tasks.gate import decide
from tasks.nas import pareto
from tasks.plan import Graph, plan
from tasks.recipe import run_search
from tasks.report import LATENCY_BS, leaderboard
from tasks.search import search_architectures
from tasks.types import (
    Budget,
    Candidate,
    CompressionRequest,
    DatasetRequest,
    DatasetSpec,
    DistillConfig,
    DlrmSpec,
    FactorizeConfig,
    MetricBudget,
    MixedPrecision,
    ModelSpec,
    PruneConfig,
    QuantizeConfig,
    RecipeSearch,
    Resources,
    SasrecSpec,
    SearchSpace,
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
    # what quantization-aware fine-tuning buys over one-shot sub-byte tables (docs/search.md)
    "qat": (
        QuantizeConfig(linear="none", embeddings="rowwise_int2"),
        QuantizeConfig(linear="none", embeddings="rowwise_int2", finetune_epochs=1),
        QuantizeConfig(linear="none", embeddings="rowwise_int4"),
        QuantizeConfig(linear="none", embeddings="rowwise_int4", finetune_epochs=1),
        QuantizeConfig(linear="int4_weight_only", embeddings="rowwise_int2", finetune_epochs=1),
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
    "two_tower": TwoTowerSpec(), "sasrec": SasrecSpec(),
    "search_two_tower": TwoTowerSpec(), "search_sasrec": SasrecSpec(),
    # small tables (run with --size small_ids): the MLPs hold ~40% of the bytes
    "search_small_tables": DlrmSpec(embedding_dim=32, bottom_mlp=(128, 32), top_mlp=(512, 256))}

class SearchSuite(NamedTuple):
    search: RecipeSearch
    faster: float | None = None  # the promoted model must also be this many times faster
    budget: float = BUDGET  # the suite's relative budget on the main metric


# the recipe-search suites: each family's hand-listed default candidates side by side with a
# recipe search (tasks.recipe) under the same budget; the ranker's must also be 2x faster
SEARCHES: dict[str, SearchSuite] = {
    "search": SearchSuite(RecipeSearch(trials=24, parallelism=4, space=SearchSpace(
        student_dims=(16, 24, 32), student_widths=(0.25,), qat_epochs=(0, 1, 2),
        table_precision=("rowwise_int4", "rowwise_int2"), linear_precision=("none",))), 2.0),
    "search_small_tables": SearchSuite(RecipeSearch(trials=12, parallelism=4, space=SearchSpace(
        student_dims=(0, 16, 24), student_widths=(0.25, 0.5), qat_epochs=(0, 1),
        linear_precision=("none", "int8_weight_only", "int4_weight_only"))), None),
    "search_two_tower": SearchSuite(RecipeSearch(trials=12, space=SearchSpace(
        student_dims=(0, 32, 48), student_widths=(0.5, 1.0), qat_epochs=(0, 1)))),
    # NDCG@10 on this split resolves about 0.5% (docs/families.md), so SASRec is judged at its
    # resolvable default of 1%; its students lose 8% and more, int2 item rows 3%, and int8
    # weight-only layers lose nothing measurable (docs/benchmarks.md): the space is the item
    # table's precision, tiered by lookups (the head at int4, the tail at int2), one-shot: an
    # epoch of QAT fake-quantizes the whole 50k-row catalogue at every step (SASRec scores it
    # all), over 20 minutes a trial on 2 cores
    "search_sasrec": SearchSuite(RecipeSearch(trials=8, space=SearchSpace(
        student_dims=(0,), table_precision=("rowwise_int4", "tiered_int4_int2"),
        head_shares=(0.2, 0.3, 0.4, 0.5), linear_precision=("none", "int8_weight_only"),
        qat_epochs=(0,))), budget=0.01),
}
for _name in SEARCHES:
    SUITES[_name] = ()  # their candidates are the family's defaults (suite_request)


def _stages(plan: Plan) -> tuple[StageConfig, ...]:
    return plan if isinstance(plan, tuple) else (plan,)


def plan_label(plan: Plan) -> str:
    return " -> ".join(stage.label() for stage in _stages(plan))


def suite_request(suite: str, size: str, seed: int = 0, data_seed: int = 0,
                  timing_seconds: float = 90.0) -> CompressionRequest:
    """The suite as the request a `recsqueeze run` would take: its family's model, the
    built-in data, every plan a candidate, the main metric's budget at `BUDGET` (a search
    suite's own where it has one)."""
    if suite not in SUITES:
        raise ValueError(f"--suite must be one of {sorted(SUITES)} (got {suite!r})")
    model = SUITE_MODELS.get(suite, DlrmSpec())
    searched = SEARCHES.get(suite)
    search = searched.search if searched else None
    faster = searched.faster if searched else None
    budget = searched.budget if searched else BUDGET
    candidates = default_candidates(model.family) if search is not None else tuple(
        Candidate(id=f"c{i:02d}", plan=_stages(p)) for i, p in enumerate(SUITES[suite]))
    return CompressionRequest(
        model_name="bench", model=model,
        dataset=DatasetRequest(builtin=size, seed=data_seed),  # type: ignore[arg-type]
        train=TrainConfig(seed=seed), candidates=candidates, search=search,
        budget=Budget(metrics={"main": MetricBudget(max_drop=budget, relative=True),
                               # the search suites also hold the logloss (a rise of at most
                               # 0.001, upper bound) where the model has one
                               **({"logloss": MetricBudget(max_drop=0.001)}
                                  if search is not None and model.family == "dlrm" else {})},
                      min_latency_ratio=faster),
        resources=Resources(timing_seconds=timing_seconds), promote=False,
        require_useful_baseline=False)


def _nas(graph: Graph, executor: Executor, executed: Executed) -> None:
    executed.results.extend(pareto(search_architectures(graph, executor, executed)))


def _recipe(graph: Graph, executor: Executor, executed: Executed) -> None:
    executed.search = run_search(graph, executor, executed)


def _search_summary(executed: Executed) -> dict[str, object] | None:
    s = executed.search
    if s is None:
        return None
    return {"trials": len(s.trials), "complete": sum(t.state == "complete" for t in s.trials),
            "pruned": sum(t.state == "pruned" for t in s.trials),
            "feasible": sum(t.feasible for t in s.trials), "wall_s": round(s.wall_s, 1),
            "cpu_s": round(s.cpu_s, 1), "gpu_s": round(s.gpu_s, 1), "front": list(s.front)}


def export_timing(baseline: nn.Module, base_spec: ModelSpec, models: list[nn.Module],
                  specs: list[ModelSpec], data_spec: DatasetSpec, test: Arrays,
                  timing_seconds: float) -> list[dict[str, object]]:
    """What serving gets: each model's `torch.export` program (tasks.export) timed side by
    side, in one run, with its eager model and with the baseline's program (batch
    LATENCY_BS). Per model: its program's p99, eager p99 / program p99 (> 1: the program is
    faster), and baseline program p99 / this program's p99 with a 95% interval - or why it
    could not be exported."""
    def program(model: nn.Module, spec: ModelSpec) -> nn.Module | str:
        try:
            return serving_export(model, spec, data_spec).program_module()
        except ExportError as exc:
            return str(exc)

    base_program = program(baseline, base_spec)
    programs = [program(m, s) for m, s in zip(models, specs, strict=True)]
    if isinstance(base_program, str):
        return [{"export_error": f"the baseline: {base_program}"} for _ in models]
    ok = [i for i, p in enumerate(programs) if not isinstance(p, str)]
    timed = [*(programs[i] for i in ok), *(models[i] for i in ok)]
    base_lat, lats, ratios = latency_ratios(base_program, timed, test,  # type: ignore[arg-type]
                                            batch_sizes=(LATENCY_BS,),
                                            max_seconds=timing_seconds)
    out: list[dict[str, object]] = [{"export_error": p} if isinstance(p, str) else {}
                                    for p in programs]
    for k, i in enumerate(ok):
        prog, eager, ratio = lats[k][0], lats[len(ok) + k][0], ratios[k][0]
        out[i] = {"export_error": None, "export_p99_ms_bs512": prog.p99_ms,
                  "export_eager_p99_ms_bs512": eager.p99_ms,
                  "export_vs_eager": eager.p99_ms / prog.p99_ms,
                  "baseline_export_p99_ms_bs512": base_lat[0].p99_ms,
                  "export_latency_ratio": ratio.value, "export_latency_ratio_low": ratio.ci_low,
                  "export_latency_ratio_high": ratio.ci_high}
    return out


def run_suite(suite: str, size: str, seed: int = 0, log: Callable[[str], None] = print,
              data_seed: int = 0, timing_seconds: float = 90.0,
              serving: bool = True) -> list[dict[str, object]]:
    """One row per candidate of `suite`: its leaderboard row (the flow's, judged by the
    flow's gate) plus what the bench adds (embedding bytes, FLOPs, the baseline's values).

    The graph is the one `recsqueeze run` would execute, run in this process
    (`LocalExecutor`); latency of all candidates is timed side by side with the baseline in
    at most `timing_seconds`. `seed` is the training seed (init, shuffling); the data stays
    the same (`data_seed`), so rows of several seeds show the spread training alone causes.
    `serving=False` leaves out the serving exports' timing (the `export_*` fields).
    """
    request = suite_request(suite, size, seed, data_seed, timing_seconds)
    executor = LocalExecutor()
    executed = run_plan(plan(request), executor, searches(request, _nas, _recipe))
    if executed.failures:
        raise RuntimeError(f"bench {suite}: candidates failed: {executed.failures}")
    for cid, why in executed.skipped.items():
        log(f"skipped {cid}: {why}")
    base = executed.evaluation.metrics
    verdict = decide(base, None, executed.results, request.budget)
    rows = {r.candidate: r for r in leaderboard(base, executed.results, verdict)}
    store = executor.store
    baseline, base_spec = store.get_model(executed.baseline.model)
    loaded = [store.get_model(result.model) for result in executed.results]
    test = to_arrays(store.read_split(executed.dataset, "test"), executed.dataset.spec,
                     base_spec.problem_kind(), base_spec.history_width())
    served = export_timing(baseline, base_spec, [m for m, _ in loaded], [s for _, s in loaded],
                           executed.dataset.spec, test, timing_seconds) if serving else \
        [{} for _ in loaded]
    out: list[dict[str, object]] = []
    for result, (model, _), serving in zip(executed.results, loaded, served, strict=True):
        row = rows[result.candidate.id]
        main = next(d for d in result.deltas if d.metric == base.main)
        ratio = next(x for x in result.latency_ratio if x.batch_size == LATENCY_BS)
        base_p99 = next(x.p99_ms for x in result.baseline_latency if x.batch_size == LATENCY_BS)
        out.append({
            "suite": suite, "size": size, "seed": seed, "candidate": row.plan,
            "family": base_spec.family,
            "config": [st.model_dump(mode="json") for st in result.candidate.plan],
            "plan": row.plan, "size_bytes": row.size_bytes,
            "embedding_bytes": embedding_bytes(model), "dense_flops": dense_flops(model),
            "baseline_embedding_bytes": embedding_bytes(baseline),
            "baseline_dense_flops": dense_flops(baseline), "params": result.metrics.params,
            "baseline_params": base.params, "baseline_bytes": base.size_bytes,
            "size_ratio": row.size_ratio, "metric": row.metric, "quality": row.quality,
            "baseline_quality": main.baseline, "delta": row.delta,
            "loss_ci_high": row.loss_ci_high,
            "relative_loss_ci_high": row.loss_ci_high / main.baseline,
            "logloss_delta": row.logloss_delta, "p99_ms_bs512": row.p99_ms_bs512,
            "baseline_p99_ms_bs512": base_p99, "latency_ratio": ratio.value,
            "latency_ratio_low": ratio.ci_low, "latency_ratio_high": ratio.ci_high,
            "latency_rounds": ratio.rounds, "passed": row.passed, "reasons": list(row.reasons),
            "budget": request.budget.metrics["main"].max_drop,
            "bayes_auc": executed.dataset.spec.bayes_auc, "test_rows": base.rows,
            "chosen": verdict.chosen == result.candidate.id,
            "search": _search_summary(executed) if result.candidate.id.startswith("search-")
            else None, **serving,
        })
        log(f"{row.plan:48s} size {row.size_ratio:5.2f}x  {row.metric} {row.delta:+.5f} "
            f"(rel loss<= {row.loss_ci_high / main.baseline:.5f})  p99 {ratio.value:4.2f}x"
            + (f"  export p99 {serving['export_latency_ratio']:4.2f}x" if serving.get(
                "export_latency_ratio") else f"  no export: {serving.get('export_error')}"))
    return out
