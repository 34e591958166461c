"""The only Prefect-decorated tasks. Each loads its inputs from S3 and writes its outputs
there: only small typed refs travel through Prefect and Ray, never weights.

Tasks are idempotent: outputs are content-addressed, so a task Ray re-runs after a lost
worker writes the same objects again.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import State, get_run_logger, task
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.events import emit_event
from pydantic import BaseModel

from infra.settings import Settings
from tasks.artifacts import ArtifactStore, Registry
from tasks.baselines import compare_trivial, resolution, trivial_predictions
from tasks.data import Arrays, read_dataset_ref, read_split, to_arrays, write_dataset
from tasks.evaluate import evaluate, latency_ratios, predict_logits
from tasks.gate import Champion
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.objectives import DEFAULT_KS, paired_deltas
from tasks.results import JSONResults, ResultJSON, result_type
from tasks.stages import StageContext, apply_stage, calibrate
from tasks.stages.calibrate import table_bytes
from tasks.stages.context import StageSkipped
from tasks.train import train
from tasks.types import (
    MAIN_METRIC,
    ArtifactRef,
    Budget,
    CalibrateConfig,
    CalibrationRefs,
    Candidate,
    CandidateResult,
    DatasetRef,
    DatasetRequest,
    Frozen,
    Measured,
    Metrics,
    ModelSpec,
    Promotion,
    Resolution,
    StageConfig,
    TrainConfig,
    TrivialBaseline,
)


def _transient(task: object, task_run: object, state: State) -> bool:
    """Retry S3/network/lost-worker failures; bad input fails at once (retrying cannot fix it;
    NotApplicable and AliasMoved are ValueErrors)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (ValueError, TypeError, KeyError, AssertionError, StageSkipped))


_TASK = dict(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=2,
             retry_condition_fn=_transient)


def result_storage(settings: Settings) -> JSONResults:
    """Prefect task results in the artifact bucket (prefect-results/), as JSON of known types
    only (tasks.results). Prefect wants the storage saved server-side: the block holds no keys
    (each process uses its own settings), so nothing secret is in the server's block store."""
    block = JSONResults()
    block.save("recsqueeze-results", overwrite=True)
    return block


_PACKAGES = ("tasks", "flows", "infra", "cluster")


@cache
def code_version() -> str:
    """sha256 over the source of every recsqueeze package. A task's own source is not
    enough: the generator, the models and the stages it calls live in other modules, and a
    cached result pickled by older code (a `DatasetSpec` without a newer field, a model
    trained by an older loop) must not be served to newer code."""
    return source_digest(Path(__file__).resolve().parent.parent)


def source_digest(root: Path) -> str:
    """sha256 over the path and bytes of every .py file of `_PACKAGES` under `root`."""
    digest = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass
class CodeVersion(CachePolicy):
    """Cache key component: the installed recsqueeze code (`code_version`)."""

    def compute_key(self, task_ctx: Any, inputs: Any, flow_parameters: Any,
                    **kwargs: Any) -> str:
        return code_version()


# fields that say where or how fast something ran, not what it is
VOLATILE = frozenset({"node_ip", "wall_s", "cpu_s", "latency", "baseline_latency",
                      "latency_ratio"})


def content(value: Any) -> Any:
    """`value` as plain JSON data without its `VOLATILE` fields, at any depth: two inputs that
    hold the same models, data and configs have equal content, whichever node built them and
    how long it took."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: content(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, (list, tuple)):
        return [content(v) for v in value]
    return value


@dataclass
class ContentInputs(CachePolicy):
    """Cache key component: the task's name and the content of its inputs (`content`)."""

    def compute_key(self, task_ctx: Any, inputs: Any, flow_parameters: Any,
                    **kwargs: Any) -> str:
        blob = json.dumps({"task": task_ctx.task.name, "inputs": content(inputs or {})},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


# every cached task is defined in this module, so the code version covers its own source too
CACHE_POLICY = ContentInputs() + CodeVersion()


def cached(task_: Any, storage: object, refresh: bool) -> Any:
    """`task_` with its result persisted to S3 and cached by (inputs, code version): a later
    call with equal inputs on the same code -- in this run or any other -- is served from the
    cache (state Cached) instead of recomputed. `refresh` recomputes and overwrites the cache
    entry. Results are stored as JSON of known types, and a record that is not one reads as a
    miss (tasks.results): nothing read back from the bucket runs."""
    return task_.with_options(cache_policy=CACHE_POLICY, persist_result=True,
                              result_storage=storage, result_serializer=ResultJSON(),
                              refresh_cache=refresh)


@result_type
class Built(Frozen):
    """A model a task produced: where it is, and where/how long it was built."""

    model: ArtifactRef
    node_ip: str
    wall_s: float
    chain: tuple[str, ...]  # stage labels from the baseline to this model
    cpu_s: float = 0.0  # CPU seconds of the task's process
    device: str = "cpu"  # where it trained: "cpu" or "cuda"

    def lineage(self) -> dict[str, object]:
        return {"stage": self.chain[-1], "model": self.model.model_dump(mode="json"),
                "ray_node": self.node_ip, "wall_s": round(self.wall_s, 3),
                "cpu_s": round(self.cpu_s, 3), "device": self.device,
                # the task held its GPU for its whole wall time
                "gpu_s": round(self.wall_s, 3) if self.device == "cuda" else 0.0}


@result_type
class Evaluated(Measured):
    metrics: Metrics
    predictions: ArtifactRef
    trivial: tuple[TrivialBaseline, ...] = ()  # the baseline vs its trivial predictors
    resolution: tuple[Resolution, ...] = ()  # per budgeted metric


def node_ip() -> str:
    """The Ray node this task runs on (the host name outside Ray)."""
    import ray

    if ray.is_initialized():
        return ray.util.get_node_ip_address()
    return socket.gethostname()


def device() -> torch.device:
    """A GPU only when Ray assigned this task one; CPU otherwise (never assume CUDA)."""
    import ray

    if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@lru_cache(maxsize=8)
def _arrays(ref_json: str, split: str, task: str, width: int) -> Arrays:
    # Ray reuses worker processes: each split is read from S3 once per worker (and layout).
    ref = DatasetRef.model_validate_json(ref_json)
    return to_arrays(read_split(ref, split, Settings()), ref.spec, task, width)


def arrays(ref: DatasetRef, split: str, spec: ModelSpec) -> Arrays:
    """One split laid out as the inputs of `spec`'s task (tasks.data.to_arrays)."""
    return _arrays(ref.model_dump_json(), split, spec.task_kind(), spec.history_width())


@lru_cache(maxsize=2)
def _reference_model(ref_json: str) -> torch.nn.Module:
    # every candidate is timed next to the baseline: fetch and rebuild it once per worker
    model, _ = ArtifactStore(Settings()).get_model(ArtifactRef.model_validate_json(ref_json))
    return model


@task(name="prepare-dataset", **_TASK)
def prepare_dataset(request: DatasetRequest) -> DatasetRef:
    """Generate the built-in click log (idempotent) or open the dataset at request.uri."""
    settings = Settings()
    if request.uri is not None:
        return read_dataset_ref(request.uri, settings)
    assert request.builtin is not None
    tables, spec = generate(request.builtin, request.seed)
    ref = write_dataset(tables, spec, settings)
    get_run_logger().info("dataset %s: %s rows, Bayes AUC %.4f", ref.uri, ref.rows,
                          spec.bayes_auc or float("nan"))
    return ref


@task(name="train-baseline", **_TASK)
def train_baseline(spec: ModelSpec, dataset: DatasetRef, cfg: TrainConfig) -> Built:
    start, cpu = time.perf_counter(), time.process_time()
    resolved = resolve(spec, dataset.spec)
    model = train(build(resolved, cfg.seed), arrays(dataset, "train", resolved), cfg, device(),
                  valid=arrays(dataset, "valid", resolved))
    ref = ArtifactStore(Settings()).put_model(model.cpu(), resolved)
    get_run_logger().info("baseline %s (%d bytes) on %s", ref.uri, ref.size_bytes, node_ip())
    return Built(model=ref, node_ip=node_ip(), wall_s=time.perf_counter() - start,
                 chain=("baseline",), cpu_s=time.process_time() - cpu, device=device().type)


@task(name="evaluate-baseline", **_TASK)
def evaluate_baseline(built: Built, dataset: DatasetRef, ks: tuple[int, ...] = DEFAULT_KS,
                      budget: Budget | None = None) -> Evaluated:
    """The baseline's metrics and predictions on the test rows; with `budget`, also its
    margins over the family's trivial predictors and each budget's resolution
    (tasks.baselines)."""
    store = ArtifactStore(Settings())
    model, spec = store.get_model(built.model)
    test = arrays(dataset, "test", spec)
    metrics, probs, _ = evaluate(model, test, built.model.size_bytes, ks=ks)
    if budget is None:
        return Evaluated(metrics=metrics, predictions=store.put_tensor(torch.from_numpy(probs)))
    task, data = spec.task_kind(), dataset.spec
    names = [c.name for c in data.categorical]
    item = names.index(data.item_id) if data.item_id in names and task == "ranking" else None
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
    store = ArtifactStore(Settings())
    key = "calibration/" + hashlib.sha256(
        f"{built.model.sha256}|{dataset.sha256}|{cfg.model_dump_json()}".encode()).hexdigest()
    cached = store.get_json(f"{key}.json")
    if cached is not None:
        get_run_logger().info("calibration served from cache %s", key)
        return CalibrationRefs.model_validate(cached)
    model, spec = store.get_model(built.model)
    result = calibrate(model, cfg, StageContext(calibration=lambda: arrays(dataset, "valid", spec),
                                                logger=get_run_logger()))  # type: ignore[arg-type]
    refs = CalibrationRefs(activations=store.put_blob(table_bytes(result.activations), "table"),
                           sensitivity=store.put_blob(table_bytes(result.sensitivity), "table"))
    store.put_json(f"{key}.json", refs.model_dump(mode="json"))
    return refs


def _table(store: ArtifactStore, ref: ArtifactRef) -> pa.Table:
    return pq.read_table(io.BytesIO(store.get_blob(ref)))


def _relative_budget(budget: Budget, spec: ModelSpec,
                     sensitivity: Callable[[], pa.Table] | None) -> float:
    """The run's budget on the main metric as a fraction of the baseline's value (0: none)."""
    main = MAIN_METRIC[spec.task_kind()]
    rule = budget.metrics.get("main") or budget.metrics.get(main)
    if rule is None:
        return 0.0
    if rule.relative or sensitivity is None:
        return rule.max_drop
    base = next(r["value"] for r in sensitivity().to_pylist() if r["choice"] == "none")
    return rule.max_drop / base


def served_logits(store: ArtifactStore, model_sha: str, load: Callable[[], torch.nn.Module],
                  dataset: DatasetRef) -> np.ndarray:
    """A ranking model's logits on the train rows, computed once per (model, dataset) and
    stored in S3 (teacher-outputs/...) for every later student and fine-tuning stage to reuse.
    (Retrieval teachers score a catalogue per row: too large to store, run alongside.)"""
    key = "teacher-outputs/" + hashlib.sha256(
        f"{model_sha}|{dataset.splits['train']}".encode()).hexdigest() + ".json"
    cached = store.get_json(key)
    if cached is not None:
        return store.get_tensor(ArtifactRef.model_validate(cached)).numpy()
    model = load()
    logits = predict_logits(model, arrays(dataset, "train", model.spec))
    ref = store.put_tensor(torch.from_numpy(logits))
    store.put_json(key, ref.model_dump(mode="json"))
    get_run_logger().info("teacher outputs of %s stored at %s", model_sha[:12], ref.uri)
    return logits


def registry_teacher(store: ArtifactStore, dataset: DatasetRef,
                     name: str) -> tuple[torch.nn.Module, np.ndarray | None]:
    """`MODEL@production`, `MODEL@previous` or `MODEL@v3` from the registry, with its logits."""
    model_name, _, which = name.partition("@")
    registry = Registry(store)
    version = int(which[1:]) if which.startswith("v") else registry.alias(model_name, which)
    if version is None or version not in registry.versions(model_name):
        raise ValueError(f"distill.teacher: the registry has no {name} (versions of "
                         f"{model_name}: {registry.versions(model_name)})")
    model, spec = registry.load(model_name, version)
    if spec != resolve(spec, dataset.spec):
        raise ValueError(f"distill.teacher: {name} was built for other data (tables or dense "
                         "features differ); choose a teacher trained on this dataset")
    sha = str(registry.version_info(model_name, version)["model"]["sha256"])
    if spec.task_kind() != "ranking":
        return model, None
    return model, served_logits(store, sha, lambda: model, dataset)


@task(name="run-stage", **_TASK)
def run_stage(parent: Built, cfg: StageConfig, dataset: DatasetRef, seed: int,
              calibration: CalibrationRefs | None = None,
              budget: Budget | None = None) -> Built:
    """Apply one stage to the parent model and store the result."""
    start, cpu = time.perf_counter(), time.process_time()
    store = ArtifactStore(Settings())
    model, spec = store.get_model(parent.model)
    sensitivity = (lambda: _table(store, calibration.sensitivity)) if calibration else None
    ctx = StageContext(
        device=device(), seed=seed, logger=get_run_logger(),  # type: ignore[arg-type]
        calibration=lambda: arrays(dataset, "valid", spec),
        train_data=lambda: arrays(dataset, "train", spec),
        activations=(lambda: _table(store, calibration.activations)) if calibration else None,
        sensitivity=sensitivity,
        max_relative_loss=_relative_budget(budget, spec, sensitivity) if budget else None,
        spec=spec,
        teacher_logits=(lambda: served_logits(store, parent.model.sha256, lambda: model,
                                              dataset)) if spec.task_kind() == "ranking" else None,
        registry_teacher=lambda name: registry_teacher(store, dataset, name),
    )
    out = apply_stage(model, cfg, ctx)
    ref = store.put_model(out.cpu(), getattr(out, "spec", spec))  # distill changes the spec
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
    store = ArtifactStore(Settings())
    model, spec = store.get_model(built.model)
    reference = _reference_model(baseline_model.model.model_dump_json()) if timed else None
    test = arrays(dataset, "test", spec)
    metrics, pred, base_latency = evaluate(model, test, built.model.size_bytes, reference, ks,
                                           timed)
    base = store.get_tensor(baseline.predictions).numpy()
    return CandidateResult(
        candidate=candidate, model=built.model, metrics=metrics,
        deltas=paired_deltas(spec.task_kind(), test, base, pred, ks, confidence),
        baseline_latency=base_latency or (), node_ip=built.node_ip, wall_s=built.wall_s,
    )


@task(name="time-candidates", **_TASK)
def time_candidates(baseline: Built, results: list[CandidateResult], dataset: DatasetRef,
                    max_seconds: float = 90.0) -> list[CandidateResult]:
    """Every candidate's latency and latency ratio with its 95% interval, timed side by side
    with the baseline in this one task - which the flow starts after every other task, holding
    all CPUs of its node, so nothing else runs on its cores while it times."""
    store = ArtifactStore(Settings())
    reference, spec = store.get_model(baseline.model)
    models = [store.get_model(r.model)[0] for r in results]
    test = arrays(dataset, "test", spec)
    # a retrieval forward scores the whole catalogue (tens of ms): fewer calls per round
    iters = 25 if spec.task_kind() == "ranking" else 10
    base_lat, lats, ratios = latency_ratios(reference, models, test, iters=iters,
                                            max_seconds=max_seconds)
    for r, ratio in zip(results, ratios):
        wide = [x for x in ratio if x.ci_high - x.ci_low > 0.1 * x.value]
        if wide:
            get_run_logger().warning("latency of %s: interval still wide after %d rounds: %s",
                                     r.candidate.id, wide[0].rounds, wide)
    return [r.model_copy(update={"metrics": r.metrics.model_copy(update={"latency": lat}),
                                 "baseline_latency": base_lat, "latency_ratio": ratio})
            for r, lat, ratio in zip(results, lats, ratios)]


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
    store = ArtifactStore(Settings())
    registry = Registry(store)
    loaded, problem = registry.load_verified(model_name, version)  # the bytes are read once
    if loaded is None:
        return Champion(version, problem="production " + str(problem).removeprefix(
            f"{model_name} "))
    model, spec = loaded
    info = registry.version_info(model_name, version)
    if spec != resolve(spec, dataset.spec) or (
            baseline_spec is not None and spec.task_kind() != baseline_spec.task_kind()):
        return Champion(version, problem=f"production v{version} cannot be measured on this "
                        "run's test rows (it was built for other data or another task); use "
                        "another model_name, or roll back / promote by hand after review")
    task = spec.task_kind()
    test = arrays(dataset, "test", spec)
    metrics, pred, _ = evaluate(model, test, int(info["model"]["size_bytes"]))
    base = store.get_tensor(baseline.predictions).numpy()
    main = MAIN_METRIC[task]
    delta = next(d.delta for d in paired_deltas(task, test, base, pred) if d.metric == main)
    return Champion(version, metrics, float(-delta))


@task(name="promote", **_TASK)
def promote(model_name: str, result: CandidateResult, files: dict[str, object],
            run_id: str, expected_production: int | None) -> Promotion:
    """Publish `result` as a new immutable registry version and point `production` at it -
    only if `production` is still `expected_production`, the version the gate measured
    (else `AliasMoved`). Retries are idempotent: keyed by run id and candidate, a retry
    finds the version it claimed and never publishes a second one."""
    registry = Registry(ArtifactStore(Settings()))
    promotion = registry.publish(model_name, result.model, files,
                                 owner=f"{run_id}/{result.candidate.id}",
                                 candidate_id=result.candidate.id,
                                 expected_production=expected_production)
    get_run_logger().info("promoted %s v%d: %s", model_name, promotion.version, promotion.uri)
    # for Prefect automations (e.g. roll a serving fleet): event name, resource = the version
    emit_event(event="recsqueeze.model.promoted",
               resource={"prefect.resource.id": f"recsqueeze.model.{model_name}.v{promotion.version}",
                         "prefect.resource.name": f"{model_name} v{promotion.version}"},
               payload={"model": model_name, "version": promotion.version, "uri": promotion.uri,
                        "candidate": result.candidate.id, "run_id": run_id,
                        "size_bytes": result.metrics.size_bytes, "metric": result.metrics.main,
                        "quality": result.metrics.value()})
    return promotion
