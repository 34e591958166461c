"""Compressed building blocks that stages swap into a model.

Each holds only plain tensors (so it saves to safetensors) and can be rebuilt empty from the
shape arguments in its `manifest()` entry: `tasks.artifacts` rebuilds a compressed model by
building the base spec, swapping in these modules at the recorded paths, and loading weights.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tasks.modules.bag import PooledTable, bags_as_tables, with_pooled_tables
from tasks.modules.embedding import HalfEmbedding, RowWiseQuantEmbedding, TieredQuantEmbedding
from tasks.modules.linear import (
    DynamicInt8Linear,
    FusedAway,
    HalfLinear,
    StaticInt8Linear,
    WeightOnlyLinear,
    fuse_relu,
)
from tasks.modules.structural import (
    LowRankEmbedding,
    LowRankLinear,
    PrunedEmbedding,
    PrunedLinear,
    SemiSparseLinear,
    SparseLinear,
    energy_rank,
    semi_structured_ok,
)
from tasks.modules.tt import QuantTTEmbedding, TTEmbedding

COMPRESSED_MODULES: dict[str, type[nn.Module]] = {
    m.kind: m for m in (RowWiseQuantEmbedding, TieredQuantEmbedding, HalfEmbedding, DynamicInt8Linear,  # type: ignore[attr-defined]
                        StaticInt8Linear, WeightOnlyLinear, HalfLinear, FusedAway, PrunedLinear,
                        SparseLinear, PrunedEmbedding, LowRankLinear, LowRankEmbedding,
                        TTEmbedding, QuantTTEmbedding, SemiSparseLinear, PooledTable)
}


def manifest_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Paths and shapes of every compressed module in `model` (derived, never stored apart)."""
    return {name: m.manifest() for name, m in model.named_modules()  # type: ignore[operator]
            if type(m) in COMPRESSED_MODULES.values()}


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path`, and at every other path that reaches the module there (a table
    shared by two features is replaced once, for both)."""
    old = model.get_submodule(path)
    paths = [p for p, m in model.named_modules(remove_duplicate=False) if m is old] or [path]
    for where in paths:
        parent_path, _, leaf = where.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, module)


def apply_manifest(model: nn.Module, manifest: dict[str, dict[str, Any]]) -> nn.Module:
    """Swap in empty compressed modules at the recorded paths (weights are loaded after)."""
    for path, entry in manifest.items():
        args = {k: v for k, v in entry.items() if k != "kind"}
        if entry["kind"] not in COMPRESSED_MODULES:
            raise ValueError(f"model manifest: unknown module kind {entry['kind']!r} at {path}")
        set_submodule(model, path, COMPRESSED_MODULES[entry["kind"]](**args))
    return model


__all__ = ["COMPRESSED_MODULES", "PooledTable", "bags_as_tables", "with_pooled_tables",
           "DynamicInt8Linear", "FusedAway", "HalfEmbedding", "HalfLinear",
           "RowWiseQuantEmbedding", "TieredQuantEmbedding", "StaticInt8Linear", "WeightOnlyLinear",
           "apply_manifest",
           "LowRankEmbedding", "LowRankLinear", "PrunedEmbedding", "PrunedLinear", "SparseLinear",
           "SemiSparseLinear", "TTEmbedding", "QuantTTEmbedding",
           "energy_rank", "semi_structured_ok", "fuse_relu", "manifest_of", "set_submodule"]
