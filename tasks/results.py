"""Task results the cache keeps in the bucket: JSON of known types, never anything that runs.

Prefect's default result serializer is cloudpickle, and a result record names its own
serializer, so whoever can write `prefect-results/` in the bucket could make every cache hit
run code. Here the cached tasks' results are pydantic models of an allow-list, written as JSON
(`ResultJSON`), and the storage (`JSONResults`) hands Prefect only records that say they are
ours, carry this deployment's seal (`tasks.artifacts.seal`: an HMAC under `Settings.signing_key`) and parse:
any other record (a pickle, a record naming another serializer, a result of an unknown type,
bytes that do not parse, a well-formed record someone else wrote) reads as missing, so Prefect
recomputes the task and overwrites the record. The storage holds no keys: every process
reaches the bucket with its own settings (`infra.settings.Settings`).
"""

from __future__ import annotations

import hmac
import json
import logging
from functools import lru_cache
from typing import Any, ClassVar, Literal

import pydantic_core
from botocore.exceptions import ClientError
from prefect.filesystems import WritableFileSystem
from prefect.serializers import Serializer
from pydantic import BaseModel, SecretStr

from infra.settings import Settings
from tasks.artifacts import s3_client, seal
from tasks.types import ArtifactRef, CalibrationRefs, CandidateResult, DatasetRef, Validated

log = logging.getLogger(__name__)

SERIALIZER = "recsqueeze-json"
SEAL = "recsqueeze-hmac"  # S3 user metadata holding a record's seal
PREFIX = "prefect-results"

# the only types a cached result may be (their fields are typed all the way down)
_TYPES: dict[str, type[BaseModel]] = {}


def result_type(cls: type[BaseModel]) -> type[BaseModel]:
    """Class decorator: `cls` may be stored as a cached task's result."""
    _TYPES[cls.__name__] = cls
    return cls


for _cls in (DatasetRef, CalibrationRefs, CandidateResult, ArtifactRef, Validated):
    result_type(_cls)


class UnreadableResult(ValueError):
    """A stored result record that is not a recsqueeze JSON record of a known type."""


class ResultJSON(Serializer):  # type: ignore[type-arg]
    """JSON of an allow-listed pydantic model, tagged with its type name; `None` as null.
    Exceptions (Prefect persists a failed task's exception) keep only their class name and
    message, and come back as `StoredError`."""

    type: Literal["recsqueeze-json"] = SERIALIZER

    def dumps(self, obj: Any) -> bytes:
        if obj is None:
            return b'{"type": null}'
        if isinstance(obj, BaseException):
            return json.dumps({"type": "error", "class": type(obj).__name__,
                               "message": str(obj)}).encode()
        name = type(obj).__name__
        if _TYPES.get(name) is not type(obj):
            raise TypeError(f"{name} is not a result type (tasks.results.result_type)")
        # NaN / inf kept (a measurement may hold them), which model_dump_json writes as null
        data = pydantic_core.to_json(obj.model_dump(mode="python"), inf_nan_mode="constants")
        return b'{"type": %s, "data": %s}' % (json.dumps(name).encode(), data)

    def loads(self, blob: bytes) -> Any:
        try:
            record = json.loads(blob)
            kind = record["type"]
            if kind is None:
                return None
            if kind == "error":
                return StoredError(f"{record['class']}: {record['message']}")
            if kind not in _TYPES:
                raise UnreadableResult(f"unknown result type {kind!r}")
            return _TYPES[kind].model_validate(record["data"])
        except UnreadableResult:
            raise
        except Exception as exc:  # noqa: BLE001 (anything that does not parse is unreadable)
            raise UnreadableResult(f"not a result record: {exc}") from None


class StoredError(RuntimeError):
    """A failed task's exception read back from storage (its class name and message only)."""


class JSONResults(WritableFileSystem):
    """Prefect result storage in the artifact bucket, under `prefect-results/`, that reads back
    only `ResultJSON` records (see the module docstring)."""

    _block_type_name: ClassVar[str] = "recsqueeze JSON results"
    _block_type_slug: ClassVar[str] = "recsqueeze-json-results"
    bucket_folder: str = PREFIX

    def _client(self) -> tuple[Any, str, bytes]:
        settings = Settings()
        return (_s3(settings.s3_endpoint, settings.s3_region, settings.s3_access_key,
                    settings.s3_secret_key), settings.s3_bucket,
                settings.signing_key.get_secret_value().encode())


    # Prefect passes `_sync` to storage blocks whose methods may be async: these are sync
    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        s3, bucket, signing = self._client()
        key = f"{self.bucket_folder}/{path}"
        meta = {SEAL: seal(signing, key, content)} if signing else {}
        s3.put_object(Bucket=bucket, Key=key, Body=content, Metadata=meta)
        return key

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        s3, bucket, signing = self._client()
        key = f"{self.bucket_folder}/{path}"
        try:
            obj = s3.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise FileNotFoundError(key) from None
            raise
        content = obj["Body"].read()
        try:
            if signing:
                given = obj.get("Metadata", {}).get(SEAL, "")
                if not hmac.compare_digest(given, seal(signing, key, content)):
                    raise UnreadableResult("not sealed with this deployment's signing key")
            else:
                _warn_unsigned()
            check_record(content)
        except UnreadableResult as exc:
            log.warning("cached result s3://%s/%s is unreadable (%s): recomputing it",
                        bucket, key, exc)
            raise
        return content


@lru_cache(maxsize=1)
def _warn_unsigned() -> None:
    log.warning("RECSQUEEZE_SIGNING_KEY is not set: cached results are checked for their type "
                "only, and a writer of the bucket could forge one; set it (the local stack "
                "does) to seal them")


@lru_cache(maxsize=4)
def _s3(endpoint: str, region: str, access_key: SecretStr, secret_key: SecretStr) -> Any:
    return s3_client(Settings(s3_endpoint=endpoint, s3_region=region, s3_access_key=access_key,
                              s3_secret_key=secret_key))


def check_record(content: bytes) -> None:
    """Raise UnreadableResult unless `content` is a Prefect result record written by
    `ResultJSON` whose result parses as an allow-listed type."""
    try:
        record = json.loads(content)
        serializer = record["metadata"]["serializer"]
        result = record["result"]
    except Exception as exc:  # noqa: BLE001
        raise UnreadableResult(f"not a JSON result record: {exc}") from None
    if serializer != {"type": SERIALIZER}:
        raise UnreadableResult(f"serializer {serializer!r} is not {SERIALIZER!r}")
    if not isinstance(result, str):
        raise UnreadableResult("the result is not a string")
    ResultJSON().loads(result.encode())
