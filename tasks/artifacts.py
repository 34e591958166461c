"""The artifact store: content-addressed blobs, models as safetensors, datasets as Parquet.

Layout (DESIGN §6):
    objects/SHA256                                   blobs (models, tables, predictions)
    runs/RUN_ID/...                                  per-run reports
    datasets/NAME/SHA/{train,valid,test}.parquet, spec.json
    registry/...                                     the model registry (tasks.registry)

Integrity: every read verifies sha256. A model is a safetensors file whose metadata holds the
ModelSpec and the manifest of compressed modules; nothing else is ever deserialized (a pickle
is refused).

Two stores share every method above the primitives `_put`/`_get`/`_size`: `ArtifactStore`
(S3, what the flow uses) and `MemoryStore` (one process: the in-process executor, bench,
notebooks, unit tests), so a model, a dataset and a measurement take the same bytes in both.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import struct
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from infra.settings import Settings
from tasks import iostats
from tasks.types import ArtifactRef, DatasetRef, DatasetSpec, ModelSpec, parse_model_spec

# torch is imported where weights are (de)serialized: the registry commands that only read
# records start in a second, not in four
if TYPE_CHECKING:
    import pyarrow as pa
    import torch
    from torch import nn



class IntegrityError(ValueError):
    """Stored bytes do not match their recorded sha256."""


class UnsafeArtifactError(ValueError):
    """The bytes are not a safetensors model (pickles and other code-bearing formats)."""


def s3_client(settings: Settings) -> Any:
    return boto3.client(
        "s3", endpoint_url=settings.s3_endpoint, region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key.get_secret_value(),
        aws_secret_access_key=settings.s3_secret_key.get_secret_value(),
        # ~1 min of jittered backoff (standard mode: up to 20 s a wait): an S3 server that is
        # restarted (`recsqueeze up`) or fails over is waited for, not reported as lost work
        config=Config(retries={"max_attempts": 10, "mode": "standard"},
                      s3={"addressing_style": "path"}),
    )


class BlobStore:
    """What both stores share: blobs under objects/SHA256 verified on every read, JSON and text
    records, models, prediction tensors and datasets. A subclass gives `_put`, `_get` (None
    when missing), `_size` (None when missing) and `uri`."""

    bucket: str
    signing_key: bytes

    def uri(self, key: str) -> str:
        raise NotImplementedError

    def key_of(self, uri: str) -> str:
        root = self.uri("")
        if not uri.startswith(root):
            raise ValueError(f"{uri!r} is not in this store ({root}...)")
        return uri[len(root):]

    def _put(self, key: str, body: bytes, content_type: str) -> None:
        raise NotImplementedError

    def _get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def _size(self, key: str) -> int | None:
        raise NotImplementedError

    def keys(self, prefix: str) -> list[str]:
        """Every key under `prefix`, sorted."""
        raise NotImplementedError

    # --- blobs -------------------------------------------------------------------------
    def put_blob(self, data: bytes, kind: str) -> ArtifactRef:
        """Store `data` under objects/SHA (idempotent: same bytes, same key). An object already
        there whose bytes do not hash to its key (corrupted, truncated, replaced) is rewritten:
        the next writer heals it instead of every later reader failing on it."""
        sha = hashlib.sha256(data).hexdigest()
        key = f"objects/{sha}"
        if not self._holds(key, sha, len(data)):
            self._put(key, data, "application/octet-stream")
        return ArtifactRef(uri=self.uri(key), sha256=sha, size_bytes=len(data), kind=kind)  # type: ignore[arg-type]

    def get_blob(self, ref: ArtifactRef) -> bytes:
        data = self._get(self.key_of(ref.uri))
        if data is None:
            raise IntegrityError(f"{ref.uri}: missing (recorded sha256 {ref.sha256})")
        got = hashlib.sha256(data).hexdigest()
        if got != ref.sha256:
            raise IntegrityError(f"{ref.uri}: sha256 {got} != recorded {ref.sha256} (corrupted)")
        return data

    def _holds(self, key: str, sha: str, size: int) -> bool:
        """Whether `key` already holds exactly the bytes of sha256 `sha`."""
        if self._size(key) != size:
            return False
        body = self._get(key)
        return body is not None and hashlib.sha256(body).hexdigest() == sha

    def put_json(self, key: str, obj: Any) -> str:
        self._put(key, json.dumps(obj, indent=2).encode(), "application/json")
        return self.uri(key)

    def get_json(self, key: str) -> Any | None:
        body = self._get(key)
        return None if body is None else json.loads(body)

    def put_text(self, key: str, text: str, content_type: str = "text/markdown") -> str:
        self._put(key, text.encode(), content_type)
        return self.uri(key)

    def put_bytes(self, key: str, body: bytes, content_type: str) -> str:
        self._put(key, body, content_type)
        return self.uri(key)

    # --- models ------------------------------------------------------------------------
    def put_model(self, model: nn.Module, spec: ModelSpec) -> ArtifactRef:
        return self.put_blob(serialize_model(model, spec), "model")

    def get_model(self, ref: ArtifactRef) -> tuple[nn.Module, ModelSpec]:
        data = self.get_blob(ref)
        try:
            return deserialize_model(data)
        except UnsafeArtifactError as exc:
            raise UnsafeArtifactError(f"{ref.uri}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 (a truncated or malformed file: name it)
            raise UnsafeArtifactError(f"{ref.uri}: not a loadable recsqueeze model "
                                      f"({type(exc).__name__}: {exc})") from None

    # --- predictions -------------------------------------------------------------------
    def put_tensor(self, tensor: torch.Tensor) -> ArtifactRef:
        from safetensors.torch import save as st_save

        return self.put_blob(canonical_safetensors(st_save({"values": tensor.contiguous()})),
                             "predictions")

    def get_tensor(self, ref: ArtifactRef) -> torch.Tensor:
        from safetensors.torch import load as st_load

        return st_load(self.get_blob(ref))["values"]

    # --- datasets ----------------------------------------------------------------------
    def put_dataset(self, tables: dict[str, pa.Table], spec: DatasetSpec) -> DatasetRef:
        """Splits + spec.json under datasets/NAME/SHA/, SHA over the splits and the spec: the
        same rows under another spec are another dataset, and an existing dataset's files are
        never rewritten (an identical import finds them and writes nothing)."""
        import pyarrow.parquet as pq

        blobs = {}
        for split in SPLITS:
            buf = io.BytesIO()
            pq.write_table(tables[split], buf, compression="zstd")
            blobs[split] = buf.getvalue()
        shas = {s: hashlib.sha256(b).hexdigest() for s, b in blobs.items()}
        sha = hashlib.sha256(("".join(shas[s] for s in SPLITS)
                              + spec.model_dump_json()).encode()).hexdigest()
        uri = self.uri(f"datasets/{spec.name}/{sha[:16]}/")
        ref = DatasetRef(uri=uri, sha256=sha, spec=spec, splits=shas,
                         rows={s: tables[s].num_rows for s in SPLITS})
        try:
            if self.dataset_ref(uri) == ref:
                return ref  # already there, complete (spec.json is written last)
        except ValueError:
            pass
        for split, blob in blobs.items():
            self._put(self.key_of(uri) + f"{split}.parquet", blob, "application/octet-stream")
        self._put(self.key_of(uri) + "spec.json", ref.model_dump_json(indent=2).encode(),
                  "application/json")
        return ref

    def dataset_ref(self, uri: str) -> DatasetRef:
        """The DatasetRef stored at `uri` (its spec.json)."""
        from pydantic import ValidationError

        key = self.key_of(uri.rstrip("/") + "/") + "spec.json"
        blob = self._get(key)
        if blob is None:
            raise ValueError(
                f"dataset.uri: no dataset at {uri} (expected {self.uri(key)}); generate one "
                "with `recsqueeze dataset generate` or set dataset.builtin")
        try:
            return DatasetRef.model_validate(json.loads(blob))
        except ValueError as exc:  # not JSON, or not a DatasetRef: edited outside an import
            what = (f"{'.'.join(map(str, exc.errors()[0]['loc']))}: {exc.errors()[0]['msg']}"
                    if isinstance(exc, ValidationError) else "not JSON")
            raise ValueError(
                f"dataset.uri: {self.uri(key)} is not a dataset record ({what}); import the "
                "dataset again (`recsqueeze dataset import`) and use the uri it prints") from None

    def read_split(self, ref: DatasetRef, split: str) -> pa.Table:
        """One split, its sha256 verified first."""
        import pyarrow.parquet as pq

        key = self.key_of(ref.uri.rstrip("/") + "/") + f"{split}.parquet"
        blob = self._get(key)
        if blob is None:
            raise ValueError(f"dataset {ref.uri}{split}.parquet: missing; import the dataset "
                             "again (`recsqueeze dataset import`)")
        got = hashlib.sha256(blob).hexdigest()
        if got != ref.splits[split]:
            raise ValueError(f"dataset {ref.uri}{split}.parquet: sha256 {got} != "
                             f"{ref.splits[split]} (corrupted or replaced); import the dataset "
                             "again (`recsqueeze dataset import`)")
        return pq.read_table(io.BytesIO(blob))


SPLITS = ("train", "valid", "test")


class ArtifactStore(BlobStore):
    """The S3 bucket of `settings` (boto3)."""

    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self.s3 = s3_client(settings)
        self.signing_key = settings.signing_key.get_secret_value().encode()

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _put(self, key: str, body: bytes, content_type: str) -> None:
        with iostats.timed("s3_put") as moved:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
            moved.append(len(body))

    def _get(self, key: str) -> bytes | None:
        try:
            with iostats.timed("s3_get") as moved:
                body: bytes = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                moved.append(len(body))
            return body
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _size(self, key: str) -> int | None:
        try:
            return int(self.s3.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                  Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


class MemoryStore(BlobStore):
    """A store in this process's memory (bench, notebooks, unit tests): no server, the same
    bytes and checks as S3."""

    def __init__(self, signing_key: bytes = b"") -> None:
        self.bucket = "memory"
        self.signing_key = signing_key
        self.objects: dict[str, bytes] = {}

    def uri(self, key: str) -> str:
        return f"mem://{self.bucket}/{key}"

    def _put(self, key: str, body: bytes, content_type: str) -> None:
        self.objects[key] = bytes(body)

    def _get(self, key: str) -> bytes | None:
        return self.objects.get(key)

    def _size(self, key: str) -> int | None:
        body = self.objects.get(key)
        return None if body is None else len(body)

    def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))


def seal(signing_key: bytes, key: str, content: bytes) -> str:
    """HMAC-SHA256 of an object's bytes and its key, under a key that never enters the
    bucket: a writer of the bucket without it can neither forge an object that verifies (not
    even a well-formed one) nor move one to another key."""
    return hmac.new(signing_key, key.encode() + b"\0" + content, hashlib.sha256).hexdigest()


def seal_record(signing_key: bytes, key: str, record: dict[str, Any]) -> str:
    """`seal` of a registry record (without its seal field), as canonical JSON."""
    body = json.dumps({k: v for k, v in record.items() if k != "seal"}, sort_keys=True)
    return seal(signing_key, key, body.encode())


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header keys sorted.

    safetensors writes its header from a hash map whose order changes from process to
    process, so identical tensors gave different bytes - and content addresses - on every
    worker. The header keeps its length (padded with spaces, as the format allows).
    """
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    canon = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(canon) > header_len:  # cannot happen for serde's compact output; keep the original
        return data
    return data[:8] + canon + b" " * (header_len - len(canon)) + data[8 + header_len:]


def serialize_model(model: nn.Module, spec: ModelSpec) -> bytes:
    """safetensors bytes: every tensor of the state dict + spec and manifest as metadata.

    Deterministic: the same weights and spec always give the same bytes (and sha256).
    """
    from safetensors.torch import save as st_save

    from tasks.modules import manifest_of

    with iostats.timed("serialize") as moved:
        state, first, aliases = {}, {}, {}
        for k, v in model.state_dict().items():
            # a table shared by two features is stored once: its other names are aliases
            where = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if v.numel() and where in first:
                aliases[k] = first[where]
                continue
            first.setdefault(where, k)
            state[k] = v.detach().cpu().contiguous()
        meta = {"format": "recsqueeze-model/1", "spec": spec.model_dump_json(),
                "manifest": json.dumps(manifest_of(model), sort_keys=True)}
        if aliases:
            meta["aliases"] = json.dumps(aliases, sort_keys=True)
        data = canonical_safetensors(st_save(state, metadata=meta))
        moved.append(len(data))
    return data


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise UnsafeArtifactError("model file is too short to be safetensors")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8 or header_len > 100_000_000 or data[8:9] != b"{":
        kind = "a pickle" if data[:1] == b"\x80" or data[:2] == b"PK" else "unknown bytes"
        raise UnsafeArtifactError(
            f"refusing to load model: the file is {kind}, not safetensors; recsqueeze loads "
            "only safetensors weights (no code is ever executed from the artifact store)")
    header = json.loads(data[8:8 + header_len])
    return header.get("__metadata__") or {}


def deserialize_model(data: bytes) -> tuple[nn.Module, ModelSpec]:
    from safetensors.torch import load as st_load

    from tasks.models import build
    from tasks.modules import apply_manifest

    with iostats.timed("deserialize") as moved:
        meta = _safetensors_metadata(data)
        if meta.get("format") != "recsqueeze-model/1":
            raise UnsafeArtifactError("safetensors file lacks recsqueeze model metadata "
                                      "(format)")
        spec = parse_model_spec(meta["spec"])
        model = apply_manifest(build(spec), json.loads(meta["manifest"]))
        state = st_load(data)
        aliases = json.loads(meta.get("aliases", "{}"))
        if not isinstance(aliases, dict) or not all(
                isinstance(v, str) and v in state for v in aliases.values()):
            raise UnsafeArtifactError("model metadata: aliases name no stored tensor")
        state.update({alias: state[name] for alias, name in aliases.items()})
        model.load_state_dict(state, strict=True)
        moved.append(len(data))
    return model.eval(), spec


