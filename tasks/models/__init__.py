"""Model families. `build(spec)` -> nn.Module; every family takes (dense, sparse) -> logits."""

from __future__ import annotations

import torch
from torch import nn

from tasks.models.dlrm import DLRM
from tasks.types import DatasetSpec, ModelSpec, TableSpec


def resolve(spec: ModelSpec, data: DatasetSpec) -> ModelSpec:
    """Fill the data-dependent fields (tables, dense width) of a requested spec."""
    tables = tuple(TableSpec(name=c.name, rows=c.cardinality) for c in data.categorical)
    return spec.model_copy(update={"tables": tables, "num_dense": len(data.dense)})


def build(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """A freshly initialised model; the same (spec, seed) always gives the same weights."""
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG state alone
        torch.manual_seed(seed)
        return _build(spec)


def _build(spec: ModelSpec) -> nn.Module:
    if not spec.tables:
        raise ValueError("model spec has no tables: call tasks.models.resolve(spec, dataset)")
    if spec.family == "dlrm":
        return DLRM(spec)
    raise ValueError(f"model.family: unknown family {spec.family!r} (known: 'dlrm')")
