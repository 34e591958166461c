"""`nn.EmbeddingBag` tables in every stage that touches tables (tasks.modules.bag): the pooled
table computes what the bag computes, and a user's model of bags (a ModuleDict, sum/mean/max,
offsets, per_sample_weights, padding_idx, one table shared by two features) is quantized,
pruned, factorized, fine-tuned, stored, imported and exported."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_model
from torch import nn

from tasks.artifacts import MemoryStore, deserialize_model, serialize_model
from tasks.data import to_arrays
from tasks.evaluate import predict
from tasks.export import serving_export
from tasks.generator import generate
from tasks.metrics import auc
from tasks.modelimport import import_model
from tasks.models import build, resolve
from tasks.modules import PooledTable, RowWiseQuantEmbedding, bags_as_tables
from tasks.stages import StageContext, apply_stage, calibrate
from tasks.train import train
from tasks.types import (
    CalibrateConfig,
    CustomSpec,
    FactorizeConfig,
    MixedPrecision,
    PruneConfig,
    QuantizeConfig,
    TrainConfig,
)

SPEC = CustomSpec(class_path="tests.user_models.bag_ranker:BagRanker", task="ranking",
                  embedding_dim=8)


def _same_as_bag(bag: nn.EmbeddingBag, *args, **kw) -> None:
    pooled = PooledTable.from_bag(bag)
    want, got = bag(*args, **kw), pooled(*args, **kw)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_a_pooled_table_computes_what_the_bag_computes(mode):
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(50, 6, mode=mode, padding_idx=3)
    ids = torch.tensor([1, 3, 7, 7, 3, 49, 0, 2, 3])
    _same_as_bag(bag, torch.tensor([[1, 2, 3], [3, 3, 3], [4, 5, 49]]))  # 2-D: fixed bags
    _same_as_bag(bag, ids, torch.tensor([0, 2, 2, 5]))  # an empty bag, a bag of padding
    last = nn.EmbeddingBag(50, 6, mode=mode, include_last_offset=True)
    _same_as_bag(last, ids, torch.tensor([0, 4, 4, 9]))
    if mode == "sum":
        _same_as_bag(bag, ids, torch.tensor([0, 4]), per_sample_weights=torch.rand(9))


def test_a_pooled_table_exports_and_refuses_max_norm():
    torch.manual_seed(0)
    pooled = PooledTable.from_bag(nn.EmbeddingBag(30, 4, mode="mean"))
    ids, offsets = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 1, 3])
    program = torch.export.export(pooled, (ids, offsets), strict=False)
    torch.testing.assert_close(program.module()(ids, offsets), pooled(ids, offsets))
    with pytest.raises(ValueError, match="max_norm"):
        PooledTable.from_bag(nn.EmbeddingBag(30, 4, max_norm=1.0))


@pytest.fixture(scope="module")
def trained():
    """A BagRanker trained on the tiny click log, its valid rows and a stage context."""
    tables, data = generate("tiny", 0)
    spec = resolve(SPEC, data)
    tr, va = (to_arrays(tables[s], data) for s in ("train", "valid"))
    model = train(build(spec, 0), tr, TrainConfig(epochs=2, batch_size=256), valid=va)
    cal = calibrate(model, CalibrateConfig(rows=2000, sensitivity_rows=3000),
                    StageContext(calibration=lambda: va))
    ctx = StageContext(calibration=lambda: va, train_data=lambda: tr, spec=spec,
                       activations=lambda: cal.activations, sensitivity=lambda: cal.sensitivity,
                       max_relative_loss=0.01)
    return model, spec, va, ctx, data


def _shared(model: nn.Module) -> bool:
    return model.bags["category_id"] is model.bags["user_segment"]


Q, P, F = QuantizeConfig, PruneConfig, FactorizeConfig
PLANS = {
    "rowwise_int8": (Q(linear="none", embeddings="rowwise_int8"),),
    "rowwise_int4+int8_linear": (Q(linear="int8_weight_only", embeddings="rowwise_int4"),),
    "rowwise_int2": (Q(linear="none", embeddings="rowwise_int2"),),
    "fp16": (Q(linear="fp16", embeddings="fp16"),),
    "tiered_int4_int2": (Q(linear="none", embeddings="tiered_int4_int2"),),
    "mixed_precision": (Q(mixed_precision=MixedPrecision()),),
    "qat_int4": (Q(linear="none", embeddings="rowwise_int4", finetune_epochs=1),),
    "pruned_rows": (P(method="embedding_rows", sparsity=0.5),),
    "structured+int8": (P(method="structured", sparsity=0.5), Q()),
    "low_rank_tables": (F(target="embeddings", rank=4),),
    "tt_tables+int8_cores": (F(target="tt_embeddings", rank=8, finetune_epochs=1),
                             Q(linear="none", embeddings="rowwise_int8")),
}


@pytest.mark.parametrize("plan", list(PLANS), ids=list(PLANS))
def test_every_table_stage_compresses_a_model_of_bags(trained, plan):
    model, spec, valid, ctx, _ = trained
    out = model
    for cfg in PLANS[plan]:
        out = apply_stage(out, cfg, ctx)
    assert all(type(m) is nn.EmbeddingBag for m in model.bags.values())  # input untouched
    assert not any(type(m) is nn.EmbeddingBag for m in out.modules())
    assert _shared(out), "the table shared by two features is still one table"
    blob = serialize_model(out, spec)
    assert len(blob) < len(serialize_model(model, spec))  # measured bytes, smaller
    loaded, _ = deserialize_model(blob)
    assert _shared(loaded)
    base, pred = predict(model, valid), predict(out, valid)
    assert (predict(loaded, valid) == pred).all()
    assert not np.array_equal(base, pred)  # the stage changed the numbers ...
    assert auc(valid.label, base) - auc(valid.label, pred) < 0.03  # ... and kept the model


def test_a_shared_table_is_stored_once(trained):
    model, spec, _, ctx, _ = trained
    int8 = apply_stage(model, PLANS["rowwise_int8"][0], ctx)
    packed = int8.bags["category_id"].table
    assert isinstance(packed, RowWiseQuantEmbedding) and int8.bags["user_segment"].table is packed
    blob = serialize_model(int8, spec)
    twice = packed.packed.numel()
    from safetensors.torch import load as st_load

    stored = st_load(blob)
    assert sum(k.endswith("packed") and v.numel() == twice for k, v in stored.items()
               if k.startswith(("bags.category_id", "bags.user_segment"))) == 1


def test_a_model_of_bags_imports_from_save_model(trained, tmp_path):
    """safetensors' save_model stores a shared table under one of its names: the import
    finds the other through the model."""
    model, spec, valid, _, data = trained
    tables, _ = generate("tiny", 0)
    store = MemoryStore()
    ref = store.put_dataset(tables, data)
    save_model(model, str(tmp_path / "bags.safetensors"))
    record, _ = import_model(store, (tmp_path / "bags.safetensors").read_bytes(), SPEC, ref,
                             "bags", valid)
    loaded, _ = store.get_model(record.model)
    assert (predict(loaded, valid) == predict(model, valid)).all()


def test_a_quantized_model_of_bags_exports_with_the_eager_numbers(trained):
    model, spec, valid, ctx, data = trained
    out = apply_stage(model, PLANS["rowwise_int4+int8_linear"][0], ctx)
    export = serving_export(out, spec, data)
    assert export.serving["checked"]["max_abs_diff_vs_eager"] < 1e-4
    dense, sparse = torch.from_numpy(valid.dense[:64]), torch.from_numpy(valid.sparse[:64])
    torch.testing.assert_close(export.program_module()(dense, sparse), out(dense, sparse),
                               rtol=1e-4, atol=1e-4)
    assert isinstance(bags_as_tables(nn.Sequential(nn.EmbeddingBag(3, 2)))[0], PooledTable)
