"""Bring your own trained model: check its weights against a spec and a dataset, then store it.

`recsqueeze model import WEIGHTS --spec spec.json --dataset URI --name NAME` runs
`import_model`. The weights are a safetensors file or a torch state_dict file (read with
`torch.load(weights_only=True)`: tensors and plain containers only, never a pickled module or
any code). Checks run before anything is written, in this order, and stop at the first problem
with an `ImportRefused` naming what was found and the fix:

1. the file: not empty, readable as safetensors or as a weights-only state_dict, a flat
   mapping of names to tensors;
2. every floating tensor finite (NaN and Inf are named with the tensor);
3. the spec builds a model on the dataset's tables (a `custom` class takes the spec);
4. a strict load: every missing, unexpected or mis-shaped tensor named, with both shapes
   (fp16/bf16 tensors are widened into the model's float32 parameters);
5. the model runs on rows of the dataset's valid split: finite outputs of the problem kind's
   shape (ranking `[B]`, retrieval and next_item `[B, items]`).

Then the model is stored content-addressed (objects/SHA256, a recsqueeze safetensors file) and
its sealed `ImportRecord` under imports/NAME/SHA256.json, last. The same weights, spec and
dataset give the same bytes, so importing them again finds the record and writes nothing.

A run names the import as its baseline (`"baseline"` in the request, `baseline_source`):
the URI printed here, `NAME@latest` (the newest import under NAME), or `NAME@production` /
`NAME@vN` (the baseline that registry version was compressed from, so a nightly run
re-compresses the same source on newer data).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import io
import pickle
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from infra.settings import Settings
from tasks.artifacts import ArtifactStore, BlobStore, seal_record, serialize_model
from tasks.data import Arrays
from tasks.models import build, resolve
from tasks.types import ArtifactRef, CompressionRequest, DatasetRef, ModelSpec
from tasks.types.record import ImportRecord, Lineage

CHECK_ROWS = 256  # rows of the valid split the imported model must run on
SOURCE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9\-]{0,62})@(?P<which>latest|production|previous"
                    r"|v[1-9][0-9]*)$")


class ImportRefused(ValueError):
    """The weights, the spec or the model's outputs cannot be imported: what and the fix."""


# --- 1. the file ---------------------------------------------------------------------------
def read_weights(data: bytes) -> tuple[dict[str, torch.Tensor], str]:
    """The file's tensors by name and its format ("safetensors" or "state_dict")."""
    if not data:
        raise ImportRefused("weights: the file is empty; save the trained model's "
                            "state_dict (safetensors.torch.save_model or torch.save)")
    if _looks_like_safetensors(data):
        from safetensors.torch import load as st_load

        try:
            return dict(st_load(data)), "safetensors"
        except Exception as exc:  # noqa: BLE001 (the library's reasons vary: name it)
            raise ImportRefused(f"weights: not a readable safetensors file ({_one_line(exc)}); "
                                "is it truncated? save it again") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)",
                           str(exc), re.S)
        why = _one_line(reason.group(1) if reason else exc)  # type: ignore[arg-type]
        if "global" not in why.lower():  # not a pickle of objects at all
            raise ImportRefused(f"weights: neither safetensors nor a torch state_dict file "
                                f"(torch.load weights_only=True: {why})") from None
        raise ImportRefused(
            "weights: refused: the file holds pickled objects that are not tensors (a whole "
            f"module or code; torch.load weights_only=True: {why}); save model.state_dict() "
            "instead, or safetensors") from None
    except Exception as exc:  # noqa: BLE001 (truncated zip, not a torch file at all)
        raise ImportRefused(f"weights: neither safetensors nor a torch state_dict file "
                            f"({_one_line(exc)}); is it truncated?") from None
    if not isinstance(obj, Mapping):
        raise ImportRefused(f"weights: the file holds {type(obj).__name__}, not a state_dict "
                            "(a mapping of names to tensors); save model.state_dict()")
    bad = next((k for k, v in obj.items() if not isinstance(k, str)
                or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ImportRefused(f"weights: entry {bad!r} is not a tensor ({type(obj[bad]).__name__}; "
                            "a checkpoint of model, optimizer and step?); save "
                            "model.state_dict() alone")
    return dict(obj), "state_dict"


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 9:
        return False
    (header_len,) = struct.unpack("<Q", data[:8])
    return data[8:9] == b"{" and header_len <= len(data) - 8


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


# --- 2. finite -----------------------------------------------------------------------------
def check_finite(state: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point():
            bad = ~torch.isfinite(tensor)
            if bool(bad.any()):
                what = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
                raise ImportRefused(f"weights: tensor {name!r} holds {what} ({int(bad.sum())} of "
                                    f"{tensor.numel()} values); the model diverged or the file "
                                    "is damaged: import a finite checkpoint")


# --- 3. + 4. build and load strictly -------------------------------------------------------
def build_for(spec: ModelSpec) -> nn.Module:
    try:
        return build(spec, 0)
    except Exception as exc:  # noqa: BLE001 (a user's class may raise anything)
        what = getattr(spec, "class_path", spec.family)
        raise ImportRefused(f"model: {what} cannot be built from the spec "
                            f"({type(exc).__name__}: {_one_line(exc)}); give the spec the "
                            "model was trained with") from None


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load `state` into `model`, refusing any difference in names or shapes. A table shared
    by two features appears under both names in the model; the file may hold either."""
    own = model.state_dict()
    def storage(key: str) -> tuple[int, tuple[int, ...]]:
        return own[key].untyped_storage().data_ptr(), tuple(own[key].shape)

    aliases: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for key in own:
        aliases.setdefault(storage(key), []).append(key)
    missing = [k for k in own if k not in state
               and not any(a in state for a in aliases[storage(k)])]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k!r} is {list(state[k].shape)} in the file, {list(own[k].shape)} in the model"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"missing {_names(missing)}" if missing else "",
                f"unexpected {_names(unexpected)}" if unexpected else "",
                "; ".join(shapes)]
    if any(problems):
        raise ImportRefused(
            f"weights do not fit {type(model).__name__} built from the spec on this dataset: "
            + "; ".join(p for p in problems if p) + " (tables take the dataset's "
            "cardinalities: import on the dataset the model was trained for, with its spec)")
    full = {k: state[k] if k in state else state[next(a for a in aliases[storage(k)]
                                                       if a in state)] for k in own}
    model.load_state_dict(full, strict=True)  # copies: fp16/bf16 widen into float32


def _names(keys: list[str]) -> str:
    shown = ", ".join(map(repr, keys[:5]))
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


# --- 5. it runs on the data ----------------------------------------------------------------
@torch.inference_mode()
def check_outputs(model: nn.Module, spec: ModelSpec, rows: Arrays, dataset: str) -> None:
    rows = rows.take(slice(0, CHECK_ROWS))
    n = len(rows)
    try:
        out = model.eval()(torch.from_numpy(rows.dense), torch.from_numpy(rows.sparse))
    except Exception as exc:  # noqa: BLE001 (the user's forward)
        raise ImportRefused(f"model: forward failed on {n} rows of dataset {dataset} "
                            f"({type(exc).__name__}: {_one_line(exc)})") from None
    kind = spec.problem_kind()
    items = next((t.rows for t in spec.tables if t.name == spec.item_table), 0)
    want = [n] if kind == "ranking" else [n, items]
    if not isinstance(out, torch.Tensor) or list(out.shape) != want:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ImportRefused(f"model: forward on {n} rows gave {got}; a {kind} model returns "
                            f"{want} (docs/byo-model.md, the protocol)")
    if not bool(torch.isfinite(out).all()):
        raise ImportRefused(f"model: forward on {n} rows of dataset {dataset} gave NaN or Inf "
                            "outputs; check the weights and the dense features' statistics")


# --- the import ----------------------------------------------------------------------------
def import_model(store: BlobStore, weights: bytes, spec: ModelSpec, dataset: DatasetRef,
                 name: str, valid: Arrays | None = None,
                 now: Callable[[], datetime.datetime] | None = None) -> tuple[ImportRecord, bool]:
    """Check `weights` (steps 1-5 of the module docstring), store the model and its sealed
    record; (the record, whether anything was written). `valid`: the dataset's valid split as
    the spec's inputs (read from the store when None)."""
    from tasks.registry import MODEL_NAME
    from tasks.runtime import arrays

    if not MODEL_NAME.fullmatch(name):
        raise ImportRefused(f"--name {name!r}: 1-63 lowercase letters, digits and '-', "
                            "starting with a letter or digit")
    state, fmt = read_weights(weights)
    check_finite(state)
    try:
        resolved = resolve(spec, dataset.spec)
    except ValueError as exc:
        raise ImportRefused(f"model: {exc}") from None
    model = build_for(resolved)
    load_strict(model, state)
    check_outputs(model, resolved, valid if valid is not None else
                  arrays(dataset, "valid", resolved), dataset.uri)
    data = serialize_model(model, resolved)
    sha = hashlib.sha256(data).hexdigest()
    key = f"imports/{name}/{sha}.json"
    ref = store.put_blob(data, "model")  # writes only what is missing or damaged (heals it)
    found = _read_record(store, key)
    if found is not None:
        return found, False
    record = ImportRecord(
        model_name=name, model=ref, spec=resolved, source_sha256=hashlib.sha256(
            weights).hexdigest(), source_format=fmt,  # type: ignore[arg-type]
        source_dtypes=tuple(sorted({str(t.dtype).removeprefix("torch.")
                                    for t in state.values() if t.is_floating_point()})),
        dataset={"uri": dataset.uri, "sha256": dataset.sha256},
        imported_at=(now or _utcnow)().isoformat(timespec="seconds"))
    body = record.model_dump(mode="json")
    store.put_json(key, {**body, "seal": seal_record(store.signing_key, key, body)})
    return _read_record(store, key) or record, True


def import_file(path: Path, spec: ModelSpec, dataset_uri: str, name: str,
                settings: Settings) -> tuple[ImportRecord, bool]:
    """`recsqueeze model import` in Python: the weights at `path` checked and stored in the
    settings' S3 bucket (`import_model`), and the Prefect event of a new import sent to the
    settings' server (which starts `compress/on-import`). (the record, whether it was new)

    Example::

        record, new = import_file(Path("ranker.safetensors"), parse_model_spec({"family": "dlrm"}),
                                  "s3://artifacts/datasets/shop/3f2a9c0d1b7e4a55/", "ranker",
                                  Settings())
        record.model.uri  # the request's "baseline"
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImportRefused(f"weights: cannot read {path} ({exc.strerror})") from None
    store = ArtifactStore(settings)
    record, written = import_model(store, data, spec, store.dataset_ref(dataset_uri), name)
    if written:
        imported_event(record, settings.prefect_api_url)
    return record, written


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _read_record(store: BlobStore, key: str) -> ImportRecord | None:
    """The record at `key` if it is there, parses and its seal verifies; else None."""
    from pydantic import ValidationError

    try:
        raw = store.get_json(key)
    except ValueError:  # not JSON
        return None
    if not isinstance(raw, dict):
        return None
    if not hmac.compare_digest(str(raw.get("seal", "")),
                               seal_record(store.signing_key, key, raw)):
        return None
    try:
        return ImportRecord.model_validate(raw)
    except ValidationError:
        return None


def imports(store: BlobStore, name: str) -> list[ImportRecord]:
    """Every verified import under `name`, oldest first (a record whose seal does not verify
    is left out: it was not written by an import)."""
    records = [r for k in store.keys(f"imports/{name}/") if k.endswith(".json")
               if (r := _read_record(store, k)) is not None]
    return sorted(records, key=lambda r: (r.imported_at, r.model.sha256))


# --- a run's baseline ----------------------------------------------------------------------
def baseline_source(store: BlobStore, source: str) -> ImportRecord:
    """The import a request's `baseline` names: its URI, NAME@latest, or the baseline of a
    registry version (NAME@production, NAME@previous, NAME@vN)."""
    match = SOURCE.match(source)
    if match is None:
        sha = source.rstrip("/").rsplit("/", 1)[-1]
        keys = [k for k in store.keys("imports/") if k.endswith(f"/{sha}.json")]
        if source != store.uri(f"objects/{sha}") or not keys:
            raise ValueError(f"baseline: {source} is not an imported model of this store; give "
                             "the URI `recsqueeze model import` printed, or NAME@latest")
        records = [r for k in keys if (r := _read_record(store, k)) is not None]
        if not records:
            raise ValueError(f"baseline: the import record of {source} does not verify (its "
                             "seal: edited in the bucket?); import the model again")
        return min(records, key=lambda r: r.imported_at)
    name, which = match["name"], match["which"]
    if which == "latest":
        found = imports(store, name)
        if not found:
            raise ValueError(f"baseline: no model was imported under {name!r}; run "
                             f"`recsqueeze model import WEIGHTS --name {name} ...` first")
        return found[-1]
    return _registry_baseline(store, name, which)


def _registry_baseline(store: BlobStore, name: str, which: str) -> ImportRecord:
    from tasks.registry import Registry

    if not isinstance(store, ArtifactStore):
        raise ValueError(f"baseline: {name}@{which} needs the model registry (S3)")
    registry = Registry(store)
    version = registry.named_version(name, which, "baseline")
    _, problem = registry.load_verified(name, version)
    if problem is not None:
        raise ValueError(f"baseline: {name} v{version} does not verify: {problem}")
    lineage = Lineage.model_validate(store.get_json(
        f"registry/{name}/versions/{version}/lineage.json"))
    source = lineage.baseline_source
    if source is None:
        raise ValueError(f"baseline: {name} v{version} was compressed from a baseline the run "
                         "trained, not from an import; name an import (NAME@latest or its URI)")
    record = _read_record(store, f"imports/{source.model_name}/{source.model.sha256}.json")
    if record is None or record.model != source.model:
        raise ValueError(f"baseline: the import {name} v{version} was compressed from "
                         f"({source.model.uri}) is gone or does not verify; import it again")
    return record


def load_imported(store: BlobStore, record: ImportRecord, dataset: DatasetRef) -> ArtifactRef:
    """The imported model, checked to fit `dataset` (the tables of its spec): the baseline
    node of a run that compresses an import."""
    _, spec = store.get_model(record.model)  # sha256 verified
    try:
        fits = resolve(spec, dataset.spec) == spec
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"baseline: {record.model_name} ({record.model.uri}) was imported for dataset "
            f"{record.dataset['uri']}, and dataset {dataset.uri} has other columns or "
            "cardinalities; import the model again on this dataset")
    return record.model


def resolve_baseline(store: BlobStore, request: CompressionRequest,
                     ) -> tuple[CompressionRequest, ImportRecord | None]:
    """The request as it runs and the import it compresses: a request naming a `baseline`
    takes the import's spec (and that family's defaults); any other is returned as it is."""
    if request.baseline is None:
        return request, None
    record = baseline_source(store, request.baseline)
    return request.with_baseline(record.spec), record


IMPORTED_EVENT = "recsqueeze.model.imported"
"""The Prefect event of a new import (a deployment trigger starts a compression run on it)."""


def imported_event(record: ImportRecord, api_url: str) -> None:
    """Tell the Prefect server at `api_url` of a new import: event `recsqueeze.model.imported`
    naming the model and its URI (`flows.deployments`' trigger starts a run on it). Sent and
    waited for before returning; nothing without a server."""
    if not api_url:
        return
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        emit_event(event=IMPORTED_EVENT,
                   resource={"prefect.resource.id": f"recsqueeze.import.{record.model_name}."
                                                    f"{record.model.sha256[:16]}",
                             "prefect.resource.name": record.model_name},
                   payload={"model": record.model_name, "uri": record.model.uri,
                            "sha256": record.model.sha256, "family": record.spec.family,
                            "dataset": record.dataset["uri"],
                            "imported_at": record.imported_at})
        EventsWorker.drain_all(timeout=30)
