"""Tiered tables: the most looked-up rows at the head dtype, the long tail at fewer bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tasks.artifacts import deserialize_model, serialize_model
from tasks.data import to_arrays
from tasks.evaluate import predict
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.modules import RowWiseQuantEmbedding, TieredQuantEmbedding, manifest_of
from tasks.quant.tiers import head_rows, lookup_counts
from tasks.stages import StageContext, apply_stage
from tasks.stages.context import NotApplicable
from tasks.types import DlrmSpec, FactorizeConfig, MixedPrecision, QuantizeConfig, SasrecSpec
from tasks.types.search import SearchSpace


@pytest.fixture(scope="module")
def data():
    return generate("tiny", 0)


def _setup(data, spec):
    tables, ds = data
    spec = resolve(spec, ds)
    train, valid = (to_arrays(tables[s], ds, spec.problem_kind(), spec.history_width())
                    for s in ("train", "valid"))
    ctx = StageContext(train_data=lambda: train, calibration=lambda: valid, spec=spec)
    return build(spec, 0).eval(), spec, train, valid, ctx


def test_each_row_is_stored_at_its_tiers_bits_and_found_by_one_search():
    torch.manual_seed(0)
    w = torch.randn(1000, 24)
    head = torch.tensor([999, 3, 0, 500, 42])
    table = TieredQuantEmbedding.from_float(w, head, 8, 2)
    want = RowWiseQuantEmbedding.from_float(w, 2).dequantize()  # a row's codes are its own
    want[head] = RowWiseQuantEmbedding.from_float(w, 8).dequantize()[head]
    ids = torch.tensor([[0, 1, 2, 3], [999, 998, 42, 43]])
    torch.testing.assert_close(table(ids), want[ids], atol=1e-6, rtol=0)
    torch.testing.assert_close(table(torch.arange(1000)), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(table.dequantize(), want, atol=1e-6, rtol=0)
    assert table.head_ids.tolist() == [0, 3, 42, 500, 999]
    # bytes: the head at int8 plus a 4-byte id each, the tail at int2
    nbytes = sum(t.numel() * t.element_size() for t in table.state_dict().values())
    assert nbytes == 5 * (24 + 8) + 5 * 4 + 995 * (6 + 4)
    with pytest.raises(ValueError, match="distinct rows"):
        TieredQuantEmbedding.from_float(w, torch.tensor([1, 1]), 8, 2)
    with pytest.raises(ValueError, match="distinct rows"):
        TieredQuantEmbedding.from_float(w, torch.tensor([1000]), 8, 2)


def test_the_head_is_the_most_looked_up_rows_on_the_train_split(data):
    model, _, train, _, _ = _setup(data, DlrmSpec(embedding_dim=16, bottom_mlp=(32, 16),
                                                  top_mlp=(32,)))
    counts = lookup_counts(model, ["embeddings.0"], train)["embeddings.0"]
    rows = model.embeddings[0].weight.shape[0]
    want = np.bincount(train.sparse[:100_000, 0], minlength=rows)
    assert counts.tolist() == want.tolist()
    head = head_rows(counts, model.embeddings[0].weight, 0.1)
    assert head.numel() == round(0.1 * rows)
    assert counts[head].min() >= np.sort(want)[::-1][head.numel() - 1]


def test_a_lookup_of_every_row_leaves_the_order_of_the_histories(data):
    """SASRec scores the whole catalogue through its item table: every row gains the same
    count per batch, so the head is still the items the histories hold most."""
    model, _, train, _, _ = _setup(data, SasrecSpec(embedding_dim=16, heads=2, layers=1,
                                                    ffn_dim=16))
    counts = lookup_counts(model, ["embeddings.0"], train, batch_size=512)["embeddings.0"]
    hist = train.sparse[train.sparse >= 0]
    n_items = model.n_items
    batches = -(-len(train) // 512)
    want = np.bincount(hist, minlength=n_items + 1)
    want[n_items] += (train.sparse < 0).sum()  # the padding row
    want += batches  # every row (the padding row too), once per batch
    assert counts.tolist() == want.tolist()


@pytest.mark.parametrize("family", ["dlrm", "sasrec"])
def test_tiered_quantization_keeps_the_model_and_round_trips(data, family):
    spec = DlrmSpec(embedding_dim=16, bottom_mlp=(32, 16), top_mlp=(32,)) if family == "dlrm" \
        else SasrecSpec(embedding_dim=16, heads=2, layers=1, ffn_dim=16)
    model, spec, _, valid, ctx = _setup(data, spec)
    int2 = apply_stage(model, QuantizeConfig(linear="none", embeddings="rowwise_int2"), ctx)
    cfg = QuantizeConfig(linear="none", embeddings="tiered_int8_int2", head_share=0.25)
    assert cfg.label() == "quantize(tiered_int8_int2@head0.25)"
    q = apply_stage(model, cfg, ctx)
    tiered = [m for m in q.modules() if isinstance(m, TieredQuantEmbedding)]
    assert tiered and all(m.head_ids.numel() == round(0.25 * m.rows) for m in tiered)
    blob = serialize_model(q, spec)
    assert len(serialize_model(int2, spec)) < len(blob) < len(serialize_model(model, spec))
    loaded, _ = deserialize_model(blob)
    p_base, p_q, p_loaded = predict(model, valid), predict(q, valid), predict(loaded, valid)
    assert (p_q == p_loaded).all()
    if family == "dlrm":  # the head at int8 is closer to the float model than int2 everywhere
        err = np.abs(p_q - p_base).mean()
        assert err < np.abs(predict(int2, valid) - p_base).mean()
    assert any(e["kind"] == "tiered_quant_embedding" for e in manifest_of(q).values())


def test_qat_fake_quantizes_each_row_at_its_tier(data):
    from tasks.quant.qat import fake_quantized, fake_rows

    model, *_ = _setup(data, DlrmSpec(embedding_dim=16, bottom_mlp=(32, 16), top_mlp=(32,)))
    table = model.embeddings[0]
    head = torch.tensor([0, 1])
    ids = torch.tensor([0, 1, 2, 3])
    with fake_quantized(model, {"embeddings.0": "tiered_int8_int2"}, heads={"embeddings.0": head}):
        out = table(ids)
    raw = table.weight[ids].detach()
    torch.testing.assert_close(out[:2], fake_rows(raw[:2], 8))
    torch.testing.assert_close(out[2:], fake_rows(raw[2:], 2))
    assert not table._forward_hooks  # plain float again

    model, spec, _, valid, ctx = _setup(data, SasrecSpec(embedding_dim=16, heads=2, layers=1,
                                                         ffn_dim=16))
    q = apply_stage(model, QuantizeConfig(linear="none", embeddings="tiered_int4_int2",
                                          finetune_epochs=1), ctx)
    assert isinstance(q.embeddings[0], TieredQuantEmbedding)
    assert np.isfinite(predict(q, valid)).all()


def test_a_tiered_dtype_where_it_cannot_work_is_refused_by_name(data):
    model, spec, _, _, ctx = _setup(data, DlrmSpec(embedding_dim=16, bottom_mlp=(32, 16),
                                                   top_mlp=(32,)))
    tt = apply_stage(model, FactorizeConfig(target="tt_embeddings", rank=4, finetune_epochs=0),
                     ctx)
    with pytest.raises(NotApplicable, match="tiered_int8_int2 tiers the rows"):
        apply_stage(tt, QuantizeConfig(embeddings="tiered_int8_int2"), ctx)
    with pytest.raises(ValueError, match="needs ctx.train_data"):
        apply_stage(model, QuantizeConfig(embeddings="tiered_int8_int2"), StageContext())
    with pytest.raises(ValidationError, match="head_share"):
        QuantizeConfig(embeddings="tiered_int8_int2", head_share=1.0)
    with pytest.raises(ValidationError, match="no calibrated sensitivity"):
        MixedPrecision(embedding_choices=("none", "tiered_int8_int2"))
    with pytest.raises(ValidationError, match="head_shares"):
        SearchSpace(head_shares=(0.0,))
    assert isinstance(model.embeddings[0], nn.Embedding)  # the input is left as it was
