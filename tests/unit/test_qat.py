"""Quantization-aware fine-tuning (tasks.quant.qat, QuantizeConfig.finetune_epochs)."""

import pytest
import torch
from torch import nn

from tasks.data import to_arrays
from tasks.evaluate import predict
from tasks.generator import generate
from tasks.metrics import auc
from tasks.models import build, resolve
from tasks.modules import RowWiseQuantEmbedding, WeightOnlyLinear
from tasks.plan import needs_teacher
from tasks.quant.qat import fake_quantized, fake_rows, fake_symmetric
from tasks.stages import StageContext, apply_stage
from tasks.train import train
from tasks.types import DlrmSpec, QuantizeConfig, TrainConfig

SPEC = DlrmSpec(embedding_dim=16, bottom_mlp=(32, 16), top_mlp=(32,))


@pytest.fixture(scope="module")
def trained():
    tables, data_spec = generate("tiny", 0)
    spec = resolve(SPEC, data_spec)
    tr, valid = (to_arrays(tables[s], data_spec) for s in ("train", "valid"))
    model = train(build(spec), tr, TrainConfig(epochs=2, batch_size=256))
    return model, valid, StageContext(calibration=lambda: valid, train_data=lambda: tr)


def test_fake_rows_match_the_packed_table_and_pass_gradients():
    w = torch.randn(50, 16, requires_grad=True)
    for bits in (8, 4, 2):
        packed = RowWiseQuantEmbedding.from_float(w, bits, "minmax").dequantize()
        fq = fake_rows(w, bits)
        assert torch.allclose(fq, packed, atol=1e-3), bits
        fq.sum().backward()
        assert torch.equal(w.grad, torch.ones_like(w))  # straight through
        w.grad = None


def test_fake_symmetric_matches_weight_only_linear():
    layer = nn.Linear(32, 8)
    for bits, group in ((8, None), (4, 16)):
        stored = WeightOnlyLinear.from_float(layer, bits, group).dequantized_weight()
        assert torch.allclose(fake_symmetric(layer.weight, bits, group), stored, atol=1e-6)


def test_hooks_leave_a_plain_float_model(trained):
    model, valid, _ = trained
    copy_ = build(resolve(SPEC, generate("tiny", 0)[1]))
    copy_.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in copy_.state_dict().items()}
    choices = {p: "rowwise_int2" for p, m in copy_.named_modules() if isinstance(m, nn.Embedding)}
    choices |= {p: "int4_weight_only" for p, m in copy_.named_modules() if isinstance(m, nn.Linear)}
    plain = predict(copy_, valid)
    with fake_quantized(copy_, choices):
        assert not torch.allclose(torch.from_numpy(predict(copy_, valid)), torch.from_numpy(plain))
    assert set(copy_.state_dict()) == set(before)  # parametrizations removed
    assert all(torch.equal(copy_.state_dict()[k], v) for k, v in before.items())
    assert torch.allclose(torch.from_numpy(predict(copy_, valid)), torch.from_numpy(plain))


def test_qat_changes_the_weights_and_recovers_int2_tables(trained):
    model, valid, ctx = trained
    one_shot = QuantizeConfig(linear="none", embeddings="rowwise_int2", row_range="minmax")
    qat = one_shot.model_copy(update={"finetune_epochs": 2, "finetune_lr": 2e-3})
    assert qat.label() == "quantize(rowwise_int2/minmax,qat2)" and needs_teacher(qat)
    assert not needs_teacher(one_shot)
    a, b = apply_stage(model, one_shot, ctx), apply_stage(model, qat, ctx)
    assert isinstance(b.embeddings[0], RowWiseQuantEmbedding)
    assert not torch.equal(a.embeddings[0].packed, b.embeddings[0].packed)
    base = auc(valid.label, predict(model, valid))
    loss_one_shot = base - auc(valid.label, predict(a, valid))
    loss_qat = base - auc(valid.label, predict(b, valid))
    assert loss_qat < loss_one_shot, (loss_one_shot, loss_qat)


def test_per_layer_dtypes_override_and_bad_paths_are_named(trained):
    model, _, ctx = trained
    cfg = QuantizeConfig(linear="none", embeddings="rowwise_int8",
                         layers={"embeddings.0": "rowwise_int2", "top.0": "int8_weight_only"})
    assert "1xint2" in cfg.label()
    q = apply_stage(model, cfg, ctx)
    assert q.embeddings[0].bits == 2 and q.embeddings[1].bits == 8
    assert isinstance(q.top[0], WeightOnlyLinear)
    from tasks.stages.context import NotApplicable
    with pytest.raises(NotApplicable, match="nowhere"):
        apply_stage(model, QuantizeConfig(layers={"nowhere.1": "rowwise_int4"}), ctx)
    with pytest.raises(NotApplicable, match="not a dtype of a table"):
        apply_stage(model, QuantizeConfig(layers={"embeddings.0": "dynamic_int8"}), ctx)
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="unknown dtype"):
        QuantizeConfig(layers={"embeddings.0": "int3"})


def test_tt_cores_quantize_per_slice_round_trip_and_qat_fits_them(trained):
    from tasks.artifacts import deserialize_model, serialize_model
    from tasks.modules import QuantTTEmbedding, TTEmbedding
    from tasks.types import FactorizeConfig

    model, valid, ctx = trained
    tt = apply_stage(model, FactorizeConfig(target="tt_embeddings", rank=8, finetune_epochs=0), ctx)
    paths = [p for p, m in tt.named_modules() if isinstance(m, TTEmbedding)]
    assert paths
    spec = resolve(SPEC, generate("tiny", 0)[1])
    sizes = {}
    for bits, choice in ((8, "rowwise_int8"), (4, "rowwise_int4")):
        q = apply_stage(tt, QuantizeConfig(linear="none", embeddings=choice), ctx)
        table = q.get_submodule(paths[0])
        assert isinstance(table, QuantTTEmbedding) and table.bits == bits
        ids = torch.arange(min(50, table.rows))
        ref = tt.get_submodule(paths[0])(ids)
        err = (table(ids) - ref).abs().max() / ref.abs().max()
        assert err < (0.02 if bits == 8 else 0.2), (bits, err)
        blob = serialize_model(q, spec)
        again, _ = deserialize_model(blob)
        assert torch.equal(again.get_submodule(paths[0])(ids), table(ids))
        sizes[bits] = len(blob)
    assert sizes[4] < sizes[8] < len(serialize_model(tt, spec))
    # while fine-tuning, a TT table computes with exactly the cores it will store
    stored = apply_stage(tt, QuantizeConfig(linear="none", embeddings="rowwise_int4"), ctx)
    ids = torch.arange(50)
    with fake_quantized(tt, {paths[0]: "rowwise_int4"}):
        seen = tt.get_submodule(paths[0])(ids)
    assert torch.allclose(seen, stored.get_submodule(paths[0])(ids), atol=1e-5)
    assert all(isinstance(c, torch.nn.Parameter) for c in tt.get_submodule(paths[0]).cores)
    qat = apply_stage(tt, QuantizeConfig(linear="none", embeddings="rowwise_int4",
                                         finetune_epochs=1), ctx)
    assert isinstance(qat.get_submodule(paths[0]), QuantTTEmbedding)


def test_fake_rows_use_the_mse_clip_the_packed_table_uses():
    w = torch.randn(64, 16) * torch.linspace(0.1, 3, 16)
    for bits in (4, 2):
        packed = RowWiseQuantEmbedding.from_float(w, bits, "mse").dequantize()
        assert torch.allclose(fake_rows(w, bits, "mse"), packed, atol=1e-3), bits
        assert not torch.allclose(fake_rows(w, bits, "minmax"), packed, atol=1e-3)
