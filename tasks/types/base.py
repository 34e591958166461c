"""The two kinds of value type and the handle on stored blobs; every other module builds on
these."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Frozen(BaseModel):
    """An input (configs, requests, specs): immutable, no unknown fields, finite numbers."""

    # allow_inf_nan=False: NaN and +-inf (which Python's json reads from "NaN" / "Infinity")
    # are refused in every float field, at any depth of the request
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Measured(BaseModel):
    """A measurement (metrics, intervals, reports): NaN is a value here (an undefined interval
    is reported as such and never passes the gate)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ArtifactRef(Frozen):
    """A content-addressed blob in the artifact store; the only handle on weights."""

    uri: str = Field(description="s3://bucket/key of the blob")
    sha256: str = Field(description="hex sha256 of the bytes, verified on every read")
    size_bytes: int = Field(ge=0, description="exact size of the stored bytes")
    kind: Literal["model", "table", "json", "predictions"] = Field(description="what it holds")
