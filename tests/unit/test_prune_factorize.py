import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tasks.artifacts import deserialize_model, serialize_model
from tasks.evaluate import predict
from tasks.models import build
from tasks.modules import (
    LowRankEmbedding,
    LowRankLinear,
    PrunedEmbedding,
    PrunedLinear,
    RowWiseQuantEmbedding,
    SparseLinear,
)
from tasks.stages import StageContext, apply_stage
from tasks.types import FactorizeConfig, PruneConfig, QuantizeConfig


def test_structured_pruning_shrinks_shapes_and_round_trips(tiny_dlrm):
    model, spec, valid, _ = tiny_dlrm
    pruned = apply_stage(model, PruneConfig(method="structured", sparsity=0.5,
                                            finetune_epochs=0), StageContext())
    assert isinstance(pruned.top[0], PrunedLinear)
    assert pruned.top[0].out_features == 32 and pruned.top[2].in_features == 32
    assert pruned.top[2].out_features == 16 and pruned.top[4].in_features == 16
    assert pruned.bottom[0].out_features == 16 and pruned.bottom[2].out_features == 16
    loaded, _ = deserialize_model(serialize_model(pruned, spec))
    assert (predict(loaded, valid) == predict(pruned, valid)).all()


def test_dead_neuron_removal_is_exact():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        seq[0].weight[4:] = 0.0
        seq[0].bias[4:] = 0.0
    x = torch.randn(16, 10)
    ref = seq(x)
    from tasks.stages.prune import prune_neurons

    holder = nn.Module()
    holder.mlp = seq
    assert prune_neurons(holder, 0.5) == 4
    assert seq[0].weight.shape == (4, 10) and seq[2].weight.shape == (3, 4)
    assert torch.allclose(seq(x), ref, atol=1e-6)


def test_magnitude_pruning_stores_sparsely_and_round_trips(tiny_dlrm):
    model, spec, valid, _ = tiny_dlrm
    pruned = apply_stage(model, PruneConfig(method="magnitude", sparsity=0.8,
                                            finetune_epochs=0), StageContext())
    sparse = [m for m in pruned.modules() if isinstance(m, SparseLinear)]
    assert sparse
    total = sum(m.in_features * m.out_features for m in sparse)
    kept = sum(m.values.numel() for m in sparse)
    assert kept / total == pytest.approx(0.2, abs=0.02)
    dense_bytes = sum(m.in_features * m.out_features * 4 for m in sparse)
    sparse_bytes = sum(m.values.numel() * 4 + m.cols.numel() * m.cols.element_size()
                       + m.row_counts.numel() * 4 for m in sparse)
    assert sparse_bytes < 0.4 * dense_bytes
    loaded, _ = deserialize_model(serialize_model(pruned, spec))
    assert (predict(loaded, valid) == predict(pruned, valid)).all()
    for m in sparse:  # the stored weights are the original ones where kept
        w = m.dense_weight()
        assert (w != 0).sum() <= m.values.numel()


def test_embedding_row_pruning_keeps_frequent_rows(tiny_dlrm):
    model, spec, valid, ctx = tiny_dlrm
    pruned = apply_stage(model, PruneConfig(method="embedding_rows", sparsity=0.75,
                                            finetune_epochs=0), ctx)
    user = pruned.embeddings[0]
    assert isinstance(user, PrunedEmbedding)
    train = ctx.train_data()
    counts = np.bincount(train.sparse[:, 0], minlength=user.remap.shape[0])
    top = int(np.argmax(counts))
    assert user.remap[top] < user.table.weight.shape[0] - 1  # most frequent user kept
    rare = int(np.argmin(counts))
    assert user.remap[rare] == user.table.weight.shape[0] - 1  # rarest maps to fallback
    assert torch.equal(user(torch.tensor([top])), model.embeddings[0](torch.tensor([top])))
    assert len(serialize_model(pruned, spec)) < 0.5 * len(serialize_model(model, spec))


def test_svd_at_full_rank_reproduces_the_layer():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    low = LowRankLinear.from_linear(lin, 7)
    x = torch.randn(5, 12)
    assert torch.allclose(low(x), lin(x), atol=1e-5)


def test_low_rank_embedding_at_full_rank_reproduces_the_table():
    table = nn.Embedding(50, 8)
    low = LowRankEmbedding.from_table(table, 8)
    ids = torch.arange(50)
    assert torch.allclose(low(ids), table(ids), atol=1e-5)


def test_factorize_then_quantize_chain_round_trips(tiny_dlrm):
    model, spec, valid, ctx = tiny_dlrm
    f = apply_stage(model, FactorizeConfig(target="embeddings", rank=4, finetune_epochs=0), ctx)
    assert isinstance(f.embeddings[0], LowRankEmbedding)
    q = apply_stage(f, QuantizeConfig(embeddings="rowwise_int8"), ctx)
    assert isinstance(q.embeddings[0].a, RowWiseQuantEmbedding)
    loaded, _ = deserialize_model(serialize_model(q, spec))
    assert (predict(loaded, valid) == predict(q, valid)).all()
    assert len(serialize_model(q, spec)) < len(serialize_model(model, spec)) / 4


def test_finetuning_is_deterministic_and_not_worse_on_valid(tiny_dlrm):
    model, spec, valid, ctx = tiny_dlrm
    cfg = PruneConfig(method="structured", sparsity=0.5, finetune_epochs=1)
    a, b = apply_stage(model, cfg, ctx), apply_stage(model, cfg, ctx)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    from tasks.metrics import logloss

    raw = apply_stage(model, cfg.model_copy(update={"finetune_epochs": 0}), ctx)
    assert logloss(valid.label, predict(a, valid)) <= logloss(valid.label, predict(raw, valid))


@pytest.mark.parametrize("cls, raw, message", [
    (PruneConfig, {"sparsity": 1.0}, r"prune.sparsity must be in \(0, 1\) \(got 1.0\)"),
    (PruneConfig, {"sparsity": 0}, "prune.sparsity must be in"),
    (PruneConfig, {"method": "random"}, "method"),
    (FactorizeConfig, {"rank": 0}, r"factorize.rank must be >= 1 \(got 0\)"),
    (FactorizeConfig, {"energy": 0}, "energy"),
])
def test_bad_structural_configs_fail_clearly(cls, raw, message):
    with pytest.raises(ValidationError, match=message):
        cls.model_validate(raw)


def test_rank_that_saves_nothing_is_refused(tiny_dlrm):
    model, *_ = tiny_dlrm
    with pytest.raises(ValueError, match="no layer gets smaller"):
        apply_stage(model, FactorizeConfig(target="linear", rank=64, finetune_epochs=0),
                    StageContext())


def test_teacher_finetuning_moves_the_pruned_model_toward_the_teacher(tiny_dlrm):
    _, spec, valid, ctx = tiny_dlrm
    from tasks.train import train
    from tasks.types import TrainConfig

    model = train(build(spec, 0), ctx.train_data(), TrainConfig(epochs=1, batch_size=256),
                  valid=valid)
    raw = apply_stage(model, PruneConfig(method="structured", sparsity=0.75, finetune_epochs=0),
                      ctx)
    tuned = apply_stage(model, PruneConfig(method="structured", sparsity=0.75,
                                           finetune_epochs=1, finetune_lr=3e-3), ctx)
    teacher = predict(model, valid)
    gap = lambda m: float(np.mean((predict(m, valid) - teacher) ** 2))  # noqa: E731
    assert gap(tuned) < gap(raw)
