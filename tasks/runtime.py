"""What a node's task function reads from where it runs: the artifact store, a logger, the
device and node, the dataset's splits, and the results it hands on (`Built`, `Evaluated`).

The store is the S3 bucket of the process's settings, unless an executor chose another for
this context (`using_store`: the in-process executor's `MemoryStore`). The same task code
then runs on a Ray worker against S3 and in a notebook against memory.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache

import numpy as np
import torch

from infra.settings import Settings
from tasks.artifacts import ArtifactStore, BlobStore
from tasks.data import Arrays, to_arrays
from tasks.evaluate import predict_logits
from tasks.models import resolve
from tasks.protocol import spec_of
from tasks.registry import Registry
from tasks.results import result_type
from tasks.types import (
    ArtifactRef,
    DatasetRef,
    Frozen,
    Measured,
    Metrics,
    ModelSpec,
    Resolution,
    TrivialBaseline,
)

_STORE: ContextVar[BlobStore | None] = ContextVar("recsqueeze_store", default=None)


def current_store() -> BlobStore:
    """The store of this context: the executor's, else the S3 bucket of the settings."""
    return _STORE.get() or ArtifactStore(Settings())


@contextmanager
def using_store(store: BlobStore) -> Iterator[BlobStore]:
    """Run task functions against `store` within the block."""
    token = _STORE.set(store)
    try:
        yield store
    finally:
        _STORE.reset(token)
        _arrays.cache_clear()
        _reference_model.cache_clear()


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """Prefect's run logger inside a task or flow run; the `recsqueeze` logger outside."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()  # type: ignore[return-value]
    except MissingContextError:
        return logging.getLogger("recsqueeze")


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


@result_type
class Built(Frozen):
    """A model a task produced: where it is, and where/how long it was built (provenance:
    never part of a cache key, see tasks.cache)."""

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


@lru_cache(maxsize=8)
def _arrays(ref_json: str, split: str, kind: str, width: int) -> Arrays:
    # Ray reuses worker processes: each split is read once per worker (and layout).
    ref = DatasetRef.model_validate_json(ref_json)
    return to_arrays(current_store().read_split(ref, split), ref.spec, kind, width)


def arrays(ref: DatasetRef, split: str, spec: ModelSpec) -> Arrays:
    """One split laid out as the inputs of `spec`'s problem kind (tasks.data.to_arrays)."""
    return _arrays(ref.model_dump_json(), split, spec.problem_kind(), spec.history_width())


@lru_cache(maxsize=2)
def _reference_model(ref_json: str) -> torch.nn.Module:
    model, _ = current_store().get_model(ArtifactRef.model_validate_json(ref_json))
    return model


def reference_model(ref: ArtifactRef) -> torch.nn.Module:
    """The baseline every candidate is timed next to: fetched and rebuilt once per worker."""
    return _reference_model(ref.model_dump_json())


def served_logits(store: BlobStore, model_sha: str, load: Callable[[], torch.nn.Module],
                  dataset: DatasetRef) -> ArtifactRef:
    """A ranking model's logits on the train rows, computed once per (model, dataset) and
    stored (teacher-outputs/...) for every later student and fine-tuning stage to reuse.
    (Retrieval teachers score a catalogue per row: too large to store, run alongside.)"""
    key = "teacher-outputs/" + hashlib.sha256(
        f"{model_sha}|{dataset.splits['train']}".encode()).hexdigest() + ".json"
    cached = store.get_json(key)
    if cached is not None:
        return ArtifactRef.model_validate(cached)
    model = load()
    logits = predict_logits(model, arrays(dataset, "train", spec_of(model)))
    ref = store.put_tensor(torch.from_numpy(logits))
    store.put_json(key, ref.model_dump(mode="json"))
    run_logger().info("teacher outputs of %s stored at %s", model_sha[:12], ref.uri)
    return ref


def registry_teacher(store: BlobStore, dataset: DatasetRef,
                     name: str) -> tuple[torch.nn.Module, np.ndarray | None]:
    """`MODEL@production`, `MODEL@previous` or `MODEL@v3` from the registry, with its logits."""
    if not isinstance(store, ArtifactStore):
        raise ValueError(f"distill.teacher={name!r} needs the model registry (S3): run the "
                         "request through the compress flow, or use teacher='input'")
    model_name, _, which = name.partition("@")
    registry = Registry(store)
    version = registry.named_version(model_name, which, "distill.teacher")
    model, spec = registry.load(model_name, version)
    if spec != resolve(spec, dataset.spec):
        raise ValueError(f"distill.teacher: {name} was built for other data (tables or dense "
                         "features differ); choose a teacher trained on this dataset")
    sha = str(registry.version_info(model_name, version)["model"]["sha256"])
    if spec.problem_kind() != "ranking":
        return model, None
    return model, store.get_tensor(served_logits(store, sha, lambda: model, dataset)).numpy()
