"""The built-in DLRM on the built-in click log's multi-hot column (`recent_categories`): it
pools the column with an `nn.EmbeddingBag`, learns from it, and every table stage, the recipe
search's per-table choice, distillation and the serving export handle the bag; the two-tower
model pools it on its query side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.artifacts import deserialize_model, serialize_model
from tasks.data import query_side, to_arrays
from tasks.evaluate import predict
from tasks.export import serving_export
from tasks.generator import generate
from tasks.metrics import auc
from tasks.models import build, resolve
from tasks.recipe import large_tables
from tasks.stages import StageContext, apply_stage
from tasks.train import train
from tasks.types import (
    DistillConfig,
    DlrmSpec,
    FactorizeConfig,
    PruneConfig,
    QuantizeConfig,
    TrainConfig,
    TwoTowerSpec,
)

SPEC = DlrmSpec(embedding_dim=16, bottom_mlp=(32, 16), top_mlp=(64, 32))
WIDTH = 5  # the generator's recent_categories: multi_hot=5


@pytest.fixture(scope="module")
def multi_hot():
    tables, data = generate("tiny", 0)
    assert data.categorical[-1].name == "recent_categories"
    assert data.categorical[-1].multi_hot == WIDTH
    spec = resolve(SPEC, data)
    tr, va = (to_arrays(tables[s], data) for s in ("train", "valid"))
    model = train(build(spec, 0), tr, TrainConfig(epochs=3, batch_size=256), valid=va)
    ctx = StageContext(calibration=lambda: va, train_data=lambda: tr, spec=spec,
                       max_relative_loss=0.01)
    return model, spec, tr, va, ctx, data


def test_the_ranker_pools_the_multi_hot_column_and_learns_from_it(multi_hot):
    model, spec, tr, va, _, _ = multi_hot
    assert isinstance(model.embeddings[-1], torch.nn.EmbeddingBag)
    assert tr.sparse.shape[1] == len(spec.tables) - 1 + WIDTH
    # it uses the column: the same rows with each row's recent categories from another row
    # score worse
    shuffled = va.sparse.copy()
    shuffled[:, -WIDTH:] = np.random.default_rng(0).permutation(shuffled[:, -WIDTH:])
    other = type(va)(va.dense, shuffled, va.label, va.groups, va.segments, va.catalogue)
    assert not np.array_equal(predict(model, va), predict(model, other))
    assert auc(va.label, predict(model, va)) > auc(va.label, predict(model, other))
    # a row without earlier clicks pools to zeros, not to row 0 of the table
    empty = va.take(np.flatnonzero((va.sparse[:, -WIDTH:] < 0).all(1))[:4])
    assert len(empty) == 4
    bag = model._pooled(torch.from_numpy(empty.sparse), len(spec.tables) - 1)
    assert torch.equal(bag, torch.zeros_like(bag))


PLANS = {
    "int8": (QuantizeConfig(),),
    "per_table_int2": (QuantizeConfig(embeddings="rowwise_int8",
                                      layers={"embeddings.8.table": "rowwise_int4"}),),
    "tiered": (QuantizeConfig(linear="none", embeddings="tiered_int4_int2"),),
    "pruned_rows": (PruneConfig(method="embedding_rows", sparsity=0.5),),
    "tt+int8": (FactorizeConfig(target="tt_embeddings", rank=8, finetune_epochs=1),
                QuantizeConfig(linear="int8_weight_only")),
    "student": (DistillConfig(student=DlrmSpec(embedding_dim=8, bottom_mlp=(16, 8),
                                               top_mlp=(32,)), epochs=4, batch_size=256),),
}


@pytest.mark.parametrize("plan", list(PLANS), ids=list(PLANS))
def test_every_stage_handles_the_multi_hot_table(multi_hot, plan):
    model, spec, _, va, ctx, _ = multi_hot
    out = model
    for cfg in PLANS[plan]:
        out = apply_stage(out, cfg, ctx)
    blob = serialize_model(out, out.spec)
    assert len(blob) < len(serialize_model(model, spec))
    loaded, _ = deserialize_model(blob)
    base, pred = predict(model, va), predict(out, va)
    assert (predict(loaded, va) == pred).all() and not np.array_equal(base, pred)
    assert auc(va.label, base) - auc(va.label, pred) < 0.03


def test_the_search_names_the_bags_table_and_the_two_tower_pools_it(multi_hot):
    _, spec, _, _, _, data = multi_hot
    assert large_tables(spec, 1000) == ["embeddings.0", "embeddings.1"]
    assert large_tables(spec, 40)[-1] == "embeddings.8.table"
    tables, _ = generate("tiny", 0)
    towers = build(resolve(TwoTowerSpec(), data), 0)
    assert isinstance(towers.embeddings[-1], torch.nn.EmbeddingBag)
    sparse = torch.from_numpy(to_arrays(tables["valid"], data, "retrieval").sparse[:32])
    assert sparse.shape[1] == len(query_side(data)) - 1 + WIDTH
    scores = towers(torch.zeros(32, 0), sparse)
    assert scores.shape == (32, towers.n_items) and torch.isfinite(scores).all()
    moved = sparse.clone()  # the query vector reads the bag's slots
    moved[:, -WIDTH:] = torch.where(moved[:, -WIDTH:] >= 0, (moved[:, -WIDTH:] + 1) % 40, -1)
    changed = (sparse[:, -WIDTH:] >= 0).any(1)
    assert changed.any()
    assert not torch.allclose(towers(torch.zeros(32, 0), moved)[changed], scores[changed])


def test_the_quantized_ranker_exports_with_its_multi_hot_slots(multi_hot):
    model, spec, _, va, ctx, data = multi_hot
    out = apply_stage(model, QuantizeConfig(embeddings="rowwise_int4"), ctx)
    export = serving_export(out, spec, data)
    sparse = export.serving["inputs"][1]
    assert sparse["columns"][-WIDTH:] == [f"recent_categories[{i}]" for i in range(WIDTH)]
    assert sparse["pad"] == -1 and export.serving["checked"]["max_abs_diff_vs_eager"] < 1e-4
    dense, ids = torch.from_numpy(va.dense[:64]), torch.from_numpy(va.sparse[:64])
    torch.testing.assert_close(export.program_module()(dense, ids), out(dense, ids),
                               rtol=1e-4, atol=1e-4)
