"""Model families. `build(spec)` -> nn.Module; every model's forward takes (dense, sparse).

What the inputs are and what forward returns depends on the spec's task (DESIGN §7,
`tasks.data.to_arrays`): ranking -> one click logit per row; retrieval and next_item -> a score
for every catalogue item [B, n_items] (the target is the clicked item id).

A user's own model (`family="custom"`, `class_path="package.module:Class"`) is an installed,
importable nn.Module class built as `Class(spec)`; see docs/byo-model.md for the protocol.
Nothing is ever imported or executed from the artifact store: a stored model names its class,
which must already be installed where it is loaded.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.models.dlrm import DLRM
from tasks.models.sasrec import SASRec
from tasks.models.two_tower import TwoTower
from tasks.types import CustomSpec, DatasetSpec, ModelSpec, TableSpec
from tasks.userclass import user_class

FAMILIES: dict[str, type[nn.Module]] = {"dlrm": DLRM, "two_tower": TwoTower, "sasrec": SASRec}


def resolve(spec: ModelSpec, data: DatasetSpec) -> ModelSpec:
    """Fill the data-dependent fields (tables, dense width, item columns) of a spec."""
    tables = tuple(TableSpec(name=c.name, rows=c.cardinality, multi_hot=c.multi_hot)
                   for c in data.categorical)
    task = spec.problem_kind()
    if task != "ranking" and data.item_id is None:
        raise ValueError(f"model.family {spec.family!r} ({task}) needs the dataset's item_id "
                         f"column; dataset {data.name} sets none")
    if task == "next_item":
        if data.history is None:
            raise ValueError(f"model.family {spec.family!r} reads the user's history: dataset "
                             f"{data.name} has no history column (spec.history)")
        if spec.family == "sasrec":
            tables = tuple(t for t in tables if t.name == data.item_id)
    return spec.model_copy(update={
        "tables": tables, "num_dense": len(data.dense) if task == "ranking" else 0,
        "item_table": data.item_id, "item_feature_tables": data.item_features})


def build(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """A freshly initialised model; the same (spec, seed) always gives the same weights."""
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG state alone
        torch.manual_seed(seed)
        return _build(spec)


def _build(spec: ModelSpec) -> nn.Module:
    if not spec.tables:
        raise ValueError("model spec has no tables: call tasks.models.resolve(spec, dataset)")
    if isinstance(spec, CustomSpec):
        model = user_class(spec.class_path)(spec)
        model.spec = spec
        return model
    return FAMILIES[spec.family](spec)
