"""The model registry: immutable, versioned models under registry/MODEL/ with a production alias.

Layout (DESIGN §6):
    registry/MODEL/versions/N/{model.safetensors, spec.json, metrics.json, lineage.json,
                                card.md, pareto.png, version.json}
    registry/MODEL/aliases/production.json           -> {"version": N, "previous": M}

A version is claimed with a conditional put (If-None-Match: *), written, sealed by
version.json last (every file's sha256, an HMAC under the signing key); the alias moves after
the seal, by compare-and-swap. A version is never rewritten. What a version holds is one typed
`VersionRecord`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from tasks.artifacts import ArtifactStore, IntegrityError, seal_record
from tasks.types import ArtifactRef, ModelSpec, Promotion

if TYPE_CHECKING:
    from torch import nn

MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9\-]{0,62}")


class AliasMoved(ValueError):  # noqa: N818 (a verdict, not an error)
    """`production` no longer points where it did when this run measured its champion."""

    def __init__(self, model: str, expected: int | None, found: int | None,
                 sealed: int | None = None) -> None:
        def name(v: int | None) -> str:
            return "no version" if v is None else f"v{v}"

        self.expected, self.found, self.sealed = expected, found, sealed
        tail = (f"; v{sealed} was sealed but not made production (review it, then "
                f"`recsqueeze registry promote {model} {sealed}`)" if sealed is not None else
                f"; rerun to judge the candidates against {name(found)}")
        super().__init__(f"production moved from {name(expected)} to {name(found)} during "
                         f"this run{tail}")


ANY_VERSION = -1
"""`publish(expected_production=ANY_VERSION)`: move the alias whatever it points at."""


def _version_number(value: Any) -> bool:
    """Whether `value` is what an alias record holds for a version: an int >= 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _file_bytes(content: Any) -> bytes:
    """The bytes `_write_version` stores for one file of a version."""
    if isinstance(content, str):
        return content.encode()
    if isinstance(content, bytes):
        return content
    return json.dumps(content, indent=2).encode()



class Registry:
    """Immutable, versioned models under registry/MODEL/ with a `production` alias."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.s3 = store.s3

    def _prefix(self, model: str) -> str:
        if not MODEL_NAME.fullmatch(model):
            raise ValueError(f"model name {model!r} is not a registry name: 1-63 lowercase "
                             "letters, digits and '-', starting with a letter or digit")
        return f"registry/{model}"

    def _numbered(self, model: str, filename: str) -> list[int]:
        """Version numbers N for which versions/N/`filename` exists, ascending."""
        found: set[int] = set()
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.store.bucket,
                                       Prefix=f"{self._prefix(model)}/versions/"):
            for obj in page.get("Contents", []):
                parts = obj["Key"].split("/")
                if len(parts) == 5 and parts[4] == filename and parts[3].isdigit():
                    found.add(int(parts[3]))
        return sorted(found)

    def versions(self, model: str) -> list[int]:
        """Sealed versions (version.json present), ascending."""
        return self._numbered(model, "version.json")

    def claimed_by(self, model: str, owner: str) -> int | None:
        """The version `owner` claimed earlier (a retried promotion finds its own), if any."""
        for n in reversed(self._numbered(model, "claim.json")):
            claim = self.store.get_json(f"{self._prefix(model)}/versions/{n}/claim.json")
            if isinstance(claim, dict) and claim.get("owner") == owner:
                return n
        return None

    def _claim(self, model: str, owner: str) -> int:
        """Reserve the next version number; concurrent claimers get distinct numbers."""
        n = max(self._numbered(model, "claim.json"), default=0) + 1
        for _ in range(100):
            try:
                self.s3.put_object(
                    Bucket=self.store.bucket, Key=f"{self._prefix(model)}/versions/{n}/claim.json",
                    Body=json.dumps({"owner": owner}).encode(), IfNoneMatch="*",
                )
                return n
            except ClientError as exc:
                if exc.response["Error"]["Code"] not in ("PreconditionFailed", "412"):
                    raise
                n += 1
        raise RuntimeError(f"registry {model}: could not claim a version")

    def publish(self, model: str, model_ref: ArtifactRef, files: dict[str, Any], owner: str,
                candidate_id: str, set_production: bool = True,
                expected_production: int | None = ANY_VERSION) -> Promotion:
        """Write a new immutable version; seal it; then move the alias.

        Idempotent per `owner` (a run id and candidate): a retry finds the version it claimed,
        finishes it if it was not sealed, and never publishes a second one. With
        `expected_production` (a version, or None for "no production yet"), the alias moves
        only if it still points there - a compare-and-swap on what the gate measured; else
        `AliasMoved` (checked before anything is written, and again at the swap).
        """
        own = self.claimed_by(model, owner)
        current = self.alias(model)
        if own is not None and own in self.versions(model) and (
                not set_production or current == own):
            return self._promotion(model, own)  # a retry of a promotion that completed
        if set_production and expected_production != ANY_VERSION and \
                current != expected_production and current != own:
            raise AliasMoved(model, expected_production, current)
        n = own if own is not None else self._claim(model, owner)
        if n not in self.versions(model):
            self._write_version(model, n, model_ref, files, candidate_id)
        if set_production:
            self._move_production(model, n, expected_production)
        return self._promotion(model, n)

    def _promotion(self, model: str, n: int) -> Promotion:
        info = self.version_info(model, n)
        return Promotion(model_name=model, version=n, uri=info["uri"],
                         candidate_id=info["candidate"])

    def _write_version(self, model: str, n: int, model_ref: ArtifactRef, files: dict[str, Any],
                       candidate_id: str) -> None:
        """Every file of a claimed, unsealed version, then the seal (version.json) last."""
        base = f"{self._prefix(model)}/versions/{n}"
        self.s3.copy_object(Bucket=self.store.bucket, Key=f"{base}/model.safetensors",
                            CopySource={"Bucket": self.store.bucket,
                                        "Key": self.store.key_of(model_ref.uri)})
        for name, content in files.items():
            if isinstance(content, str):
                self.store.put_text(f"{base}/{name}", content)
            elif isinstance(content, bytes):
                self.s3.put_object(Bucket=self.store.bucket, Key=f"{base}/{name}", Body=content,
                                   ContentType="image/png" if name.endswith(".png") else
                                   "application/octet-stream")
            else:
                self.store.put_json(f"{base}/{name}", content)
        uri = self.store.uri(f"{base}/model.safetensors")
        digests = {"model.safetensors": model_ref.sha256, **{
            name: hashlib.sha256(_file_bytes(content)).hexdigest()
            for name, content in files.items()}}
        record = {"version": n, "model": model_ref.model_dump(), "uri": uri,
                  "candidate": candidate_id, "files": digests}
        if self.store.signing_key:
            record["seal"] = seal_record(self.store.signing_key, f"{base}/version.json", record)
        self.store.put_json(f"{base}/version.json", record)

    def _move_production(self, model: str, n: int, expected: int | None) -> None:
        def move(current: dict[str, Any] | None) -> dict[str, Any]:
            found = None if current is None else int(current["version"])
            if found == n:
                return current  # type: ignore[return-value]  # a retry: already there
            if expected != ANY_VERSION and found != expected:
                raise AliasMoved(model, expected, found, sealed=n)
            return {"version": n, "previous": found}

        self._swap_production(model, move)

    def _alias_key(self, model: str, alias: str) -> str:
        return f"{self._prefix(model)}/aliases/{alias}.json"

    def _read_alias(self, model: str, alias: str) -> tuple[dict[str, Any] | None, str | None]:
        key = self._alias_key(model, alias)
        try:
            obj = self.s3.get_object(Bucket=self.store.bucket, Key=key)
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey"):
                return None, None
            raise
        body = obj["Body"].read()
        try:
            doc = json.loads(body)
        except ValueError:  # not JSON (or not text at all)
            doc = None
        if not (isinstance(doc, dict) and _version_number(doc.get("version"))
                and (doc.get("previous") is None or _version_number(doc.get("previous")))):
            raise IntegrityError(f"{self.store.uri(key)}: not an alias record (got {body[:60]!r}); "
                                 "restore it, or delete it and `recsqueeze registry promote "
                                 f"{model} N`")
        return doc, obj["ETag"]

    def _swap_production(self, model: str, move: Callable[[dict[str, Any] | None],
                                                          dict[str, Any]]) -> dict[str, Any]:
        """Compare-and-swap of aliases/production.json: read it with its ETag, write
        `move(current)` only if nobody wrote in between (If-Match / If-None-Match), else retry.
        The document holds both `version` and `previous`, so the two aliases move together
        and concurrent promotions leave a consistent pair."""
        key = self._alias_key(model, "production")
        for _ in range(50):
            current, etag = self._read_alias(model, "production")
            doc = move(current)
            cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                self.s3.put_object(Bucket=self.store.bucket, Key=key,
                                   Body=json.dumps(doc).encode(),
                                   ContentType="application/json", **cond)
                return doc
            except ClientError as exc:
                if exc.response["Error"]["Code"] not in ("PreconditionFailed", "412"):
                    raise
        raise RuntimeError(f"registry {model}: the production alias kept changing; retry")

    def set_alias(self, model: str, alias: str, version: int) -> None:
        """Point `alias` at `version`. Moving `production` keeps the version it replaced as
        `previous` (in the same object, swapped atomically)."""
        if version not in self.versions(model):
            raise ValueError(f"registry {model}: version {version} does not exist (versions: "
                             f"{self.versions(model)})")
        if alias == "previous":
            raise ValueError("registry: `previous` follows `production`; use rollback to swap "
                             "them")
        if alias != "production":
            self.store.put_json(self._alias_key(model, alias), {"version": version})
            return

        def move(current: dict[str, Any] | None) -> dict[str, Any]:
            if current is None:
                return {"version": version, "previous": None}
            if current["version"] == version:
                return current
            return {"version": version, "previous": current["version"]}

        self._swap_production(model, move)

    def rollback(self, model: str) -> tuple[int, int]:
        """Swap `production` and `previous`; returns (new production, new previous)."""
        def move(current: dict[str, Any] | None) -> dict[str, Any]:
            if current is None or current.get("previous") is None:
                raise ValueError(f"registry {model}: no previous version to roll back to "
                                 f"(versions: {self.versions(model)}); promote another version "
                                 f"first: `recsqueeze registry promote {model} N`")
            return {"version": current["previous"], "previous": current["version"]}

        doc = self._swap_production(model, move)
        return int(doc["version"]), int(doc["previous"])

    def named_version(self, model: str, which: str, field: str) -> int:
        """The sealed version `which` names (`production`, `previous` or `vN`); a ValueError
        naming the request's `field` when there is none."""
        version = int(which[1:]) if which[:1] == "v" and which[1:].isdigit() else \
            self.alias(model, which)
        if version is None or version not in self.versions(model):
            raise ValueError(f"{field}: the registry has no {model}@{which} (versions of "
                             f"{model}: {self.versions(model)})")
        return version

    def alias(self, model: str, alias: str = "production") -> int | None:
        if alias == "previous":
            doc, _ = self._read_alias(model, "production")
            return None if doc is None or doc.get("previous") is None else int(doc["previous"])
        doc, _ = self._read_alias(model, alias)
        return None if doc is None else int(doc["version"])

    def version_info(self, model: str, version: int) -> dict[str, Any]:
        """The sealed record of a version, checked: its seal (an HMAC under the signing key,
        which never enters the bucket: someone who can write the bucket but is not the
        promotion cannot re-point a version at other bytes), and that its weights' uri is
        their content address."""
        key = f"{self._prefix(model)}/versions/{version}/version.json"
        try:
            raw = self.store.get_json(key)
        except ValueError:  # not JSON
            raw = "not JSON"
        if raw is None:
            raise ValueError(f"registry {model}: no sealed version {version}")
        if not isinstance(raw, dict):
            raise IntegrityError(f"{self.store.uri(key)}: not a version record (edited outside "
                                 "a promotion): fix or roll back the registry")
        if self.store.signing_key:
            given = raw.get("seal")
            want = seal_record(self.store.signing_key, key, raw)
            if not isinstance(given, str) or not hmac.compare_digest(given, want):
                raise IntegrityError(f"{self.store.uri(key)}: the version record's seal does not "
                                     "match (edited outside a promotion, or sealed with another "
                                     "signing key): fix or roll back the registry")
        ref = raw.get("model", {})
        if ref.get("uri") != self.store.uri(f"objects/{ref.get('sha256')}"):
            raise IntegrityError(f"{self.store.uri(key)}: the weights' uri {ref.get('uri')!r} is "
                                 "not their content address objects/SHA256")
        return raw

    def verify_files(self, model: str, version: int) -> str | None:
        """Why some file of the version does not match the digest its record carries, or
        None: every file is read back and hashed."""
        info = self.version_info(model, version)
        for name in sorted(info.get("files", {})):
            try:
                self.read_file(model, version, name, info)
            except IntegrityError as exc:
                return f"{model} v{version} could not be verified: {exc}"
        return None

    def read_file(self, model: str, version: int, name: str,
                  info: dict[str, Any] | None = None) -> bytes | None:
        """File `name` of a sealed version, checked against the digest its record (`info`,
        read when not given) carries; None when the record lists no such file.
        IntegrityError when the bytes are missing or differ."""
        info = info or self.version_info(model, version)
        sha = info.get("files", {}).get(name)
        if sha is None:
            return None
        key = f"{self._prefix(model)}/versions/{version}/{name}"
        try:
            body = self.s3.get_object(Bucket=self.store.bucket, Key=key)["Body"].read()
        except ClientError:
            raise IntegrityError(f"{self.store.uri(key)}: missing (version.json lists it): fix "
                                 "or roll back the registry") from None
        if hashlib.sha256(body).hexdigest() != sha:
            raise IntegrityError(f"{self.store.uri(key)}: sha256 does not match version.json "
                                 "(edited after the promotion): fix or roll back the registry")
        return bytes(body)

    def verify(self, model: str, version: int) -> str | None:
        """Why version `version` cannot be trusted (sealed record missing, bytes that do not
        match their sha256, not a recsqueeze safetensors model), or None when it loads."""
        problem = self.load_verified(model, version)[1]
        return problem or self.verify_files(model, version)

    def load_verified(self, model: str, version: int,
                      ) -> tuple[tuple[nn.Module, ModelSpec] | None, str | None]:
        """(the loaded version, None), or (None, why it cannot be trusted) - read once."""
        where = f"{self._prefix(model)}/versions/{version}"
        try:
            return self.load(model, version), None
        except IntegrityError as exc:
            if "model.safetensors: sha256" not in str(exc):  # the record itself
                return None, f"{model} v{version} could not be verified: {exc}"
            return None, (f"{model} v{version} could not be verified (sha256 mismatch in "
                          f"{where}/model.safetensors): fix or roll back the registry")
        except (ValueError, KeyError, TypeError) as exc:
            return None, (f"{model} v{version} could not be verified ({where}: {exc}): fix or "
                          "roll back the registry")

    def load(self, model: str, version: int) -> tuple[nn.Module, ModelSpec]:
        info = self.version_info(model, version)
        ref = ArtifactRef.model_validate(info["model"]).model_copy(update={"uri": info["uri"]})
        return self.store.get_model(ref)

    def models(self) -> list[str]:
        resp = self.s3.list_objects_v2(Bucket=self.store.bucket, Prefix="registry/",
                                       Delimiter="/")
        return sorted(p["Prefix"].split("/")[1] for p in resp.get("CommonPrefixes", []))
