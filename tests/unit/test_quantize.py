import torch
from torch import nn

from tasks.artifacts import deserialize_model, serialize_model
from tasks.data import generate, to_arrays
from tasks.evaluate import predict
from tasks.models import build, resolve
from tasks.modules import DynamicInt8Linear, RowWiseInt8Embedding, manifest_of
from tasks.stages import StageContext, apply_stage
from tasks.types import ModelSpec, QuantizeConfig


def test_rowwise_int8_error_is_at_most_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(500, 32) * torch.rand(500, 1) * 10  # rows with very different ranges
    q = RowWiseInt8Embedding.from_float(w)
    step = (w.max(1).values - w.min(1).values) / 255
    ids = torch.arange(500)
    err = (q(ids) - w).abs() / step[:, None]
    assert err.max() <= 0.5 + 1e-3
    assert torch.allclose(q.dequantize(), q(ids))


def test_dynamic_int8_linear_close_to_float():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = DynamicInt8Linear.from_float(lin)
    x = torch.randn(128, 64)
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.02
    assert q.weight_int8.dtype == torch.int8


def _tiny_model():
    tables, spec = generate("tiny", 0)
    model = build(resolve(ModelSpec(embedding_dim=16, bottom_mlp=(32, 16), top_mlp=(32,)), spec))
    return model, resolve(ModelSpec(embedding_dim=16, bottom_mlp=(32, 16), top_mlp=(32,)), spec), \
        to_arrays(tables["test"], spec)


def test_quantize_changes_the_model_and_shrinks_the_artifact():
    model, spec, test = _tiny_model()
    q = apply_stage(model, QuantizeConfig(), StageContext())
    assert isinstance(model.embeddings[0], nn.Embedding)  # input untouched
    assert all(isinstance(t, RowWiseInt8Embedding) for t in q.embeddings)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert len(manifest_of(q)) == len(list(q.embeddings)) + n_linear
    before, after = serialize_model(model, spec), serialize_model(q, spec)
    assert len(before) / len(after) > 2.5
    p, pq = predict(model, test), predict(q, test)
    assert abs(p - pq).max() < 0.02


def test_quantized_model_round_trips_through_safetensors():
    model, spec, test = _tiny_model()
    q = apply_stage(model, QuantizeConfig(), StageContext())
    loaded, spec2 = deserialize_model(serialize_model(q, spec))
    assert spec2 == spec
    assert (predict(loaded, test) == predict(q, test)).all()
    assert isinstance(loaded.top[0], DynamicInt8Linear)
