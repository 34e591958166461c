"""The plan's task functions, Prefect-decorated: one per node kind (tasks.plan), and promote.

Each loads its inputs from the artifact store of its context (tasks.runtime: S3 on a Ray
worker, memory in the in-process executor) and writes its outputs there: only small typed refs
travel through Prefect and Ray, never weights. Both executors call these same functions (the
Prefect one as tasks, the in-process one through `.fn`).

Tasks are idempotent: outputs are content-addressed, so a task Ray re-runs after a lost
worker writes the same objects again.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import State, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from tasks import iostats
from tasks.artifacts import ArtifactStore, BlobStore
from tasks.baselines import compare_trivial, resolution, trivial_predictions
from tasks.data import item_slot
from tasks.evaluate import evaluate, latency_ratios
from tasks.export import export_files
from tasks.gate import Champion
from tasks.generator import generate
from tasks.modelimport import load_imported
from tasks.models import build, resolve
from tasks.protocol import spec_of
from tasks.quality import paired_deltas
from tasks.registry import Registry
from tasks.runtime import (
    Built,
    Evaluated,
    arrays,
    current_store,
    device,
    node_ip,
    reference_model,
    registry_teacher,
    run_logger,
    served_logits,
)
from tasks.stages import StageContext, apply_stage, calibrate
from tasks.stages.calibrate import table_bytes
from tasks.stages.context import StageSkipped
from tasks.timing import serving_device, time_on_devices
from tasks.train import train
from tasks.types import (
    DEFAULT_KS,
    MAIN_METRIC,
    ArtifactRef,
    Budget,
    CalibrateConfig,
    CalibrationRefs,
    Candidate,
    CandidateResult,
    DatasetRef,
    DatasetRequest,
    ModelSpec,
    Promotion,
    StageConfig,
    TrainConfig,
    Validated,
)
from tasks.types.record import ImportRecord, VersionRecord

EVALUATED = "evaluated"  # the prefix of an evaluation's result line (read by flows.progress)
STARTED = "started on node"  # the line a task's first log says where it runs


def log_node(task: object, task_run: object, state: State) -> None:
    """An `on_running` hook: the task run's first log line names its Ray node (and its I/O
    counts start from zero)."""
    from prefect.logging.loggers import task_run_logger

    iostats.reset()
    task_run_logger(task_run, task).info("%s %s", STARTED, node_ip())  # type: ignore[arg-type]


def log_io(task: object, task_run: object, state: State) -> None:
    """An `on_completion` hook: the task's S3 and (de)serialization seconds, one line."""
    from prefect.logging.loggers import task_run_logger

    task_run_logger(task_run, task).info("%s", iostats.line())  # type: ignore[arg-type]


def _transient(task: object, task_run: object, state: State) -> bool:
    """Retry S3/network/lost-worker failures; bad input fails at once (retrying cannot fix it;
    NotApplicable and AliasMoved are ValueErrors)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (ValueError, TypeError, KeyError, AssertionError, StageSkipped))


# three retries, 2 s, 10 s and 30 s after a failure: a lost node or an S3 server being brought
# back by `recsqueeze up` is outlasted; bad input is not retried (`_transient`)
_TASK = dict(cache_policy=NO_CACHE, persist_result=False, retries=3,
             retry_delay_seconds=[2, 10, 30],
             retry_condition_fn=_transient)


@task(name="prepare-dataset", **_TASK)
def prepare_dataset(request: DatasetRequest) -> DatasetRef:
    """Generate the built-in click log (idempotent) or open the dataset at request.uri."""
    store = current_store()
    if request.uri is not None:
        return store.dataset_ref(request.uri)
    assert request.builtin is not None
    tables, spec = generate(request.builtin, request.seed)
    ref = store.put_dataset(tables, spec)
    run_logger().info("dataset %s: %s rows, Bayes AUC %.4f", ref.uri, ref.rows,
                          spec.bayes_auc or float("nan"))
    return ref


@task(name="train-baseline", **_TASK)
def train_baseline(spec: ModelSpec, dataset: DatasetRef, cfg: TrainConfig,
                   imported: ImportRecord | None = None) -> Built:
    """The baseline: trained from `spec` on the train split, or - `imported` - the user's
    model, loaded and checked to fit this dataset."""
    start, cpu = time.perf_counter(), time.process_time()
    if imported is not None:
        ref = load_imported(current_store(), imported, dataset)
        run_logger().info("baseline imported as %s (%s, %s)", imported.model_name, ref.uri,
                          imported.imported_at)
        return Built(model=ref, node_ip=node_ip(), wall_s=time.perf_counter() - start,
                     chain=("imported",), cpu_s=time.process_time() - cpu)
    resolved = resolve(spec, dataset.spec)
    model = train(build(resolved, cfg.seed), arrays(dataset, "train", resolved), cfg, device(),
                  valid=arrays(dataset, "valid", resolved))
    ref = current_store().put_model(model.cpu(), resolved)
    run_logger().info("baseline %s (%d bytes) on %s", ref.uri, ref.size_bytes, node_ip())
    return Built(model=ref, node_ip=node_ip(), wall_s=time.perf_counter() - start,
                 chain=("baseline",), cpu_s=time.process_time() - cpu, device=device().type)


@task(name="evaluate-baseline", **_TASK)
def evaluate_baseline(built: Built, dataset: DatasetRef, ks: tuple[int, ...] = DEFAULT_KS,
                      budget: Budget | None = None) -> Evaluated:
    """The baseline's metrics and predictions on the test rows; with `budget`, also its
    margins over the family's trivial predictors and each budget's resolution
    (tasks.baselines)."""
    store = current_store()
    model, spec = store.get_model(built.model)
    test = arrays(dataset, "test", spec)
    metrics, probs, _ = evaluate(model, test, built.model.size_bytes, ks=ks)
    if budget is None:
        return Evaluated(metrics=metrics, predictions=store.put_tensor(torch.from_numpy(probs)))
    task, data = spec.problem_kind(), dataset.spec
    item = item_slot(data) if task == "ranking" else None
    n_items = next((c.cardinality for c in data.categorical if c.name == data.item_id), 0)
    trivial = trivial_predictions(task, arrays(dataset, "train", spec), test, item, n_items)
    confidence = budget.confidence
    return Evaluated(metrics=metrics, predictions=store.put_tensor(torch.from_numpy(probs)),
                     trivial=compare_trivial(task, metrics.main, test, trivial, probs, confidence),
                     resolution=resolution(task, test, probs, budget, metrics.main, ks))


@task(name="calibrate", **_TASK)
def calibrate_model(built: Built, dataset: DatasetRef, cfg: CalibrateConfig) -> CalibrationRefs:
    """Activation ranges + sensitivity of `built` on the valid split, stored as Parquet.

    Cached in S3 under the (model, data, config) triple: a later run on the same baseline and
    data reuses the tables instead of recomputing them.
    """
    store = current_store()
    key = "calibration/" + hashlib.sha256(
        f"{built.model.sha256}|{dataset.sha256}|{cfg.model_dump_json()}".encode()).hexdigest()
    cached = store.get_json(f"{key}.json")
    if cached is not None:
        run_logger().info("calibration served from cache %s", key)
        return CalibrationRefs.model_validate(cached)
    model, spec = store.get_model(built.model)
    result = calibrate(model, cfg, StageContext(calibration=lambda: arrays(dataset, "valid", spec),
                                                logger=run_logger()))  # type: ignore[arg-type]
    refs = CalibrationRefs(activations=store.put_blob(table_bytes(result.activations), "table"),
                           sensitivity=store.put_blob(table_bytes(result.sensitivity), "table"))
    store.put_json(f"{key}.json", refs.model_dump(mode="json"))
    return refs


def _table(store: BlobStore, ref: ArtifactRef) -> pa.Table:
    return pq.read_table(io.BytesIO(store.get_blob(ref)))


def _relative_budget(budget: Budget, spec: ModelSpec,
                     sensitivity: Callable[[], pa.Table] | None) -> float:
    """The run's budget on the main metric as a fraction of the baseline's value (0: none)."""
    main = MAIN_METRIC[spec.problem_kind()]
    rule = budget.metrics.get("main") or budget.metrics.get(main)
    if rule is None:
        return 0.0
    if rule.relative or sensitivity is None:
        return rule.max_drop
    base = next(r["value"] for r in sensitivity().to_pylist() if r["choice"] == "none")
    return rule.max_drop / base


@task(name="teacher-outputs", **_TASK)
def teacher_outputs(built: Built, dataset: DatasetRef) -> ArtifactRef:
    """A ranking model's logits on the train rows (the plan's teacher node): what every
    student and teacher-targeted fine-tuning of this model reads."""
    store = current_store()
    return served_logits(store, built.model.sha256, lambda: store.get_model(built.model)[0],
                         dataset)


@task(name="run-stage", **_TASK)
def run_stage(parent: Built, cfg: StageConfig, dataset: DatasetRef, seed: int,
              calibration: CalibrationRefs | None = None,
              budget: Budget | None = None, teacher: ArtifactRef | None = None) -> Built:
    """Apply one stage to the parent model and store the result. `teacher`: the parent's
    logits on the train rows (a teacher node), for the stages that read them."""
    start, cpu = time.perf_counter(), time.process_time()
    store = current_store()
    model, spec = store.get_model(parent.model)
    sensitivity = (lambda: _table(store, calibration.sensitivity)) if calibration else None
    ctx = StageContext(
        device=device(), seed=seed, logger=run_logger(),  # type: ignore[arg-type]
        calibration=lambda: arrays(dataset, "valid", spec),
        train_data=lambda: arrays(dataset, "train", spec),
        activations=(lambda: _table(store, calibration.activations)) if calibration else None,
        sensitivity=sensitivity,
        max_relative_loss=_relative_budget(budget, spec, sensitivity) if budget else None,
        spec=spec,
        teacher_logits=(lambda: store.get_tensor(teacher).numpy()) if teacher else None,
        registry_teacher=lambda name: registry_teacher(store, dataset, name),
    )
    out = apply_stage(model, cfg, ctx)
    ref = store.put_model(out.cpu(), spec_of(out))  # distill changes the spec
    return Built(model=ref, node_ip=node_ip(), wall_s=time.perf_counter() - start,
                 chain=(*parent.chain, cfg.label()), cpu_s=time.process_time() - cpu,
                 device=ctx.device.type)


@task(name="evaluate-candidate", **_TASK)
def evaluate_candidate(candidate: Candidate, built: Built, dataset: DatasetRef,
                       baseline_model: Built, baseline: Evaluated, confidence: float,
                       ks: tuple[int, ...] = DEFAULT_KS, timed: bool = True) -> CandidateResult:
    """Quality paired with the baseline's predictions on the same rows; with `timed`, latency
    timed side by side with the baseline in this same process (the compress flow passes
    False and times every candidate in one quiet task: `time_candidates`)."""
    store = current_store()
    model, spec = store.get_model(built.model)
    reference = reference_model(baseline_model.model) if timed else None
    test = arrays(dataset, "test", spec)
    metrics, pred, base_latency = evaluate(model, test, built.model.size_bytes, reference, ks,
                                           timed)
    base = store.get_tensor(baseline.predictions).numpy()
    deltas = paired_deltas(spec.problem_kind(), test, base, pred, ks, confidence)
    main = next(d for d in deltas if d.metric == metrics.main)
    # the line the CLI's live progress shows as this candidate's result (flows.progress)
    run_logger().info("%s: %s, size %.2fx, %s %+.5f, relative loss bound %.5f", EVALUATED,
                      candidate.id, baseline_model.model.size_bytes / built.model.size_bytes,
                      main.metric, main.delta, main.loss_ci_high / max(abs(main.baseline), 1e-12))
    return CandidateResult(
        candidate=candidate, model=built.model, metrics=metrics, deltas=deltas,
        baseline_latency=base_latency or (), node_ip=built.node_ip, wall_s=built.wall_s,
    )


@task(name="validate-candidate", **_TASK)
def validate_candidate(built: Built, dataset: DatasetRef, baseline: Built, rows: int | None,
                       latency_seconds: float = 0.0) -> Validated:
    """`built` and the baseline on the valid split (its first `rows`, or all): the main
    metric of both on the same rows and, with `latency_seconds`, their batch-512 p99 timed side
    by side (a search's score; the gate measures again on the test split)."""
    start = time.perf_counter()
    store = current_store()
    model, spec = store.get_model(built.model)
    reference = reference_model(baseline.model)
    valid = arrays(dataset, "valid", spec)
    if rows is not None and rows < len(valid):
        valid = valid.take(slice(0, rows))
    mine, _, _ = evaluate(model, valid, built.model.size_bytes, timed=False)
    theirs, _, _ = evaluate(reference, valid, baseline.model.size_bytes, timed=False)
    ratio = None
    if latency_seconds > 0:
        _, _, ratios = latency_ratios(reference, [model], valid, batch_sizes=(512,), iters=5,
                                      min_rounds=3, max_rounds=30, max_seconds=latency_seconds)
        ratio = ratios[0][0].value
    value, base = mine.value(), theirs.value()
    return Validated(rows=len(valid), main=mine.main, value=value, baseline_value=base,
                     relative_loss=(base - value) / base if base else 0.0,
                     size_bytes=built.model.size_bytes, baseline_bytes=baseline.model.size_bytes,
                     p99_ratio=ratio, wall_s=time.perf_counter() - start)


@task(name="time-candidates", **_TASK)
def time_candidates(baseline: Built, results: list[CandidateResult], dataset: DatasetRef,
                    max_seconds: float = 90.0, serving: str = "auto") -> list[CandidateResult]:
    """Every candidate's latency and latency ratio with its 95% interval, timed side by side
    with the baseline in this one task - which the flow starts after every other task, holding
    all CPUs of its node (and a GPU, to time on one), so nothing else runs on its cores.

    Timed on the serving device (`serving_device`); a candidate whose modules have no kernel
    there is timed on CPU instead, with the baseline beside it, and its rows say so."""
    store = current_store()
    reference, spec = store.get_model(baseline.model)
    models = [store.get_model(r.model)[0] for r in results]
    test = arrays(dataset, "test", spec)
    # a retrieval forward scores the whole catalogue (tens of ms): fewer calls per round
    iters = 25 if spec.problem_kind() == "ranking" else 10
    timed = time_on_devices(
        reference, models, test, target=serving_device(serving), iters=iters,
        max_seconds=max_seconds,
        warn=lambda i, why: run_logger().warning("latency of %s: %s", results[i].candidate.id, why))
    out = []
    for i, r in enumerate(results):
        base_lat, lat, ratio = timed[i]
        wide = [x for x in ratio if x.ci_high - x.ci_low > 0.1 * x.value]
        if wide:
            run_logger().warning("latency of %s: interval still wide after %d rounds: %s",
                                 r.candidate.id, wide[0].rounds, wide)
        out.append(r.model_copy(update={"metrics": r.metrics.model_copy(update={"latency": lat}),
                                        "baseline_latency": base_lat, "latency_ratio": ratio}))
    return out


@task(name="evaluate-champion", **_TASK)
def evaluate_champion(model_name: str, version: int, dataset: DatasetRef,
                      baseline: Evaluated, baseline_spec: ModelSpec | None = None) -> Champion:
    """The production model on this run's test rows: its metrics and its loss of the main
    metric vs the baseline (point estimate).

    Never cached: the champion's bytes are verified (sha256) on every run. A champion that
    cannot be verified, or cannot be measured on these rows (built for other data or another
    task), comes back with `problem` set, and the gate then does not promote: nothing is
    promoted over a production model it was not compared with.
    """
    store = current_store()
    assert isinstance(store, ArtifactStore), "the registry lives in S3"
    registry = Registry(store)
    loaded, problem = registry.load_verified(model_name, version)  # the bytes are read once
    if loaded is None:
        return Champion(version, problem="production " + str(problem).removeprefix(
            f"{model_name} "))
    model, spec = loaded
    info = registry.version_info(model_name, version)
    if spec != resolve(spec, dataset.spec) or (
            baseline_spec is not None and spec.problem_kind() != baseline_spec.problem_kind()):
        return Champion(version, problem=f"production v{version} cannot be measured on this "
                        "run's test rows (it was built for other data or another task); use "
                        "another model_name, or roll back / promote by hand after review")
    task = spec.problem_kind()
    test = arrays(dataset, "test", spec)
    metrics, pred, _ = evaluate(model, test, int(info["model"]["size_bytes"]))
    base = store.get_tensor(baseline.predictions).numpy()
    main = MAIN_METRIC[task]
    delta = next(d.delta for d in paired_deltas(task, test, base, pred) if d.metric == main)
    return Champion(version, metrics, float(-delta))


@task(name="promote", **_TASK)
def promote(model_name: str, result: CandidateResult, record: VersionRecord,
            run_id: str, expected_production: int | None) -> Promotion:
    """Publish `result` as a new immutable registry version and point `production` at it -
    only if `production` is still `expected_production`, the version the gate measured
    (else `AliasMoved`). Retries are idempotent: keyed by run id and candidate, a retry
    finds the version it claimed and never publishes a second one."""
    store = current_store()
    assert isinstance(store, ArtifactStore), "the registry lives in S3"
    # the serving export (export/: a torch.export program plain torch loads) beside the
    # weights; a model that cannot be exported is promoted with serving.json saying why
    model, spec = store.get_model(result.model)
    export, reason = export_files(model, spec, record.spec.dataset_spec)
    if reason is not None:
        run_logger().warning("%s: no serving export: %s", result.candidate.id, reason)
    promotion = Registry(store).publish(model_name, result.model, {**record.files(), **export},
                                 owner=f"{run_id}/{result.candidate.id}",
                                 candidate_id=result.candidate.id,
                                 expected_production=expected_production)
    run_logger().info("promoted %s v%d: %s", model_name, promotion.version, promotion.uri)
    # for Prefect automations (e.g. roll a serving fleet): event name, resource = the version
    emit_event(event="recsqueeze.model.promoted",
               resource={"prefect.resource.id": f"recsqueeze.model.{model_name}.v{promotion.version}",
                         "prefect.resource.name": f"{model_name} v{promotion.version}"},
               payload={"model": model_name, "version": promotion.version, "uri": promotion.uri,
                        "candidate": result.candidate.id, "run_id": run_id,
                        "size_bytes": result.metrics.size_bytes, "metric": result.metrics.main,
                        "quality": result.metrics.value()})
    return promotion
