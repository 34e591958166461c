"""The retrieval and sequential families, their metrics and their stages (no stack needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tasks.artifacts import deserialize_model, serialize_model
from tasks.data import PAD, Arrays, history_matrix, to_arrays
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.models.sasrec import SelfAttention
from tasks.models.two_tower import ItemIndex
from tasks.quality import group_ndcg, paired_deltas, quality, rank_metrics
from tasks.stages import StageContext, apply_stage
from tasks.stages.prune import prune_heads
from tasks.types import (
    Budget,
    CompressionRequest,
    DistillConfig,
    FactorizeConfig,
    PruneConfig,
    QuantizeConfig,
    SasrecSpec,
    TwoTowerSpec,
)


@pytest.fixture(scope="module")
def data():
    return generate("tiny")


def _arrays(data, spec):
    tables, ds = data
    return [to_arrays(tables[s], ds, spec.problem_kind(), spec.history_width())
            for s in ("train", "valid", "test")]


def test_rank_metrics_match_hand_computed_values():
    ranks = np.array([0, 1, 9, 10, 49, 50])
    m = rank_metrics("retrieval", ranks, (10, 50))
    assert m["recall@10"].tolist() == [1, 1, 1, 0, 0, 0]
    assert m["recall@50"].tolist() == [1, 1, 1, 1, 1, 0]
    assert m["ndcg@10"][:3] == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(11)])
    assert "hr@10" in rank_metrics("next_item", ranks, (10,))


def test_session_ndcg_is_hand_computed_and_skips_lists_without_clicks():
    groups = np.array([7, 7, 7, 3, 3, 5, 5])
    label = np.array([0, 1, 1, 1, 0, 0, 0], float)
    probs = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.5, 0.4])
    got = group_ndcg(groups, label, probs, 10)
    # session 3: the click ranked 2nd of 2; session 7: clicks at ranks 2 and 3 of 3; 5: none
    ideal7 = 1 + 1 / math.log2(3)
    assert got.tolist() == pytest.approx([1 / math.log2(3), (1 / math.log2(3) + 0.5) / ideal7])


def test_generator_gives_sessions_histories_and_segments(data):
    tables, spec = data
    train = tables["train"]
    sessions = train["session_id"].to_numpy()
    assert (np.bincount(sessions - sessions.min()) == 10).all()  # 10 results per session
    assert set(train["item_popularity"].to_pylist()) == {"head", "tail"}
    assert spec.history == "history" and spec.query_id == "session_id"
    # a history holds only items the user clicked in earlier sessions
    hist = history_matrix(train["history"], 20)
    users, items = train["user_id"].to_numpy(), train["item_id"].to_numpy()
    clicks = train["click"].to_numpy().astype(bool)
    r = int(np.flatnonzero(hist[:, -1] != PAD)[-1])
    earlier = set(items[:r][clicks[:r] & (users[:r] == users[r])].tolist())
    assert set(hist[r][hist[r] != PAD].tolist()) <= earlier


def test_two_tower_index_is_its_item_tower_and_survives_quantization(data):
    spec = resolve(TwoTowerSpec(embedding_dim=16, tower_mlp=(32,)), data[1])
    train, valid, test = _arrays(data, spec)
    from tasks.train import train as fit
    from tasks.types import TrainConfig

    model = fit(build(spec), train, TrainConfig(epochs=1, batch_size=256), valid=valid)
    ids = torch.arange(model.n_items)
    with torch.no_grad():
        assert torch.allclose(model.index.weight, model.item_vectors(ids), atol=1e-6)
    ctx = StageContext(train_data=lambda: train, calibration=lambda: valid, spec=spec)
    small = apply_stage(model, QuantizeConfig(linear="none", embeddings="rowwise_int8"), ctx)
    assert type(small.index).__name__ == "RowWiseQuantEmbedding"  # the index is compressed
    low = apply_stage(model, FactorizeConfig(target="embeddings", rank=4, finetune_epochs=0), ctx)
    assert type(low.index) is ItemIndex  # shape-changing stages leave the index to its towers
    base, q = (quality("retrieval", test, m(test)) for m in (
        lambda t: _predict(model, t), lambda t: _predict(small, t)))
    assert base[0]["recall@50"].value > 0.1  # learned something: random is 50/1000
    assert abs(q[0]["recall@50"].value - base[0]["recall@50"].value) < 0.03


def _predict(model, test):
    from tasks.evaluate import predict

    return predict(model, test)


def test_sasrec_reads_empty_histories_and_prunes_whole_heads(data):
    spec = resolve(SasrecSpec(embedding_dim=16, heads=4, layers=1,
                             ffn_dim=32), data[1])
    model = build(spec).eval()
    empty = torch.full((3, 20), PAD)
    assert torch.isfinite(model(torch.zeros(3, 0), empty)).all()
    attention = next(m for m in model.modules() if isinstance(m, SelfAttention))
    with torch.no_grad():  # head 2 contributes nothing: pruning it keeps the outputs
        attention.o.weight[:, 8:12] = 0
        for p in (attention.q, attention.k, attention.v):
            p.weight[8:12] *= 1e-3
    history = torch.randint(0, spec.tables[0].rows, (5, 20))
    before = model(torch.zeros(5, 0), history)
    assert prune_heads(model, 0.25) == 1
    assert attention.q.out_features == 12 and attention.o.in_features == 12
    torch.testing.assert_close(model(torch.zeros(5, 0), history), before, atol=1e-4, rtol=0)
    loaded, _ = deserialize_model(serialize_model(model, spec))  # heads follow the shapes
    torch.testing.assert_close(loaded(torch.zeros(5, 0), history), before, atol=1e-4, rtol=0)


def test_sasrec_stages_change_the_model(data):
    spec = resolve(SasrecSpec(embedding_dim=16, heads=2, layers=2,
                             ffn_dim=32), data[1])
    train, valid, test = _arrays(data, spec)
    model = build(spec).eval()
    ctx = StageContext(train_data=lambda: train, calibration=lambda: valid, spec=spec)
    pruned = apply_stage(model, PruneConfig(method="structured", finetune_epochs=0), ctx)
    heads = [m.q.out_features // m.head_dim for m in pruned.modules()
             if isinstance(m, SelfAttention)]
    assert heads == [1, 1] and pruned.blocks[0].ffn[0].out_features == 16
    student = apply_stage(model, DistillConfig(
        student=SasrecSpec(embedding_dim=16, heads=1, layers=1, ffn_dim=16),
        epochs=1, batch_size=256), ctx)
    assert len(student.blocks) == 1 and student.spec.layers == 1
    base = _predict(model, test)
    deltas = {d.metric for d in paired_deltas("next_item", test, base, _predict(student, test))}
    assert {"hr@10", "ndcg@10", "ndcg@10[user_type=new]"} <= deltas


def test_a_student_of_another_family_is_refused(data):
    spec = resolve(SasrecSpec(embedding_dim=16), data[1])
    train, valid, _ = _arrays(data, spec)
    ctx = StageContext(train_data=lambda: train, calibration=lambda: valid, spec=spec)
    with pytest.raises(ValueError, match="distill.student.family is 'dlrm' but the input "
                                         "model is 'sasrec'"):
        apply_stage(build(spec), DistillConfig(), ctx)


@pytest.mark.parametrize("raw, message", [
    ({"model": {"family": "sasrec"}, "budget": {"metrics": {"auc": {"max_drop": 0.01}}}},
     "a sasrec model (next_item) is not measured on auc"),
    ({"model": {"family": "two_tower"}, "budget": {"metrics": {"hr@10": {"max_drop": 0.01}}}},
     "a two_tower model (retrieval) is not measured on hr"),
    ({"budget": {"metrics": {"recall@10": {"max_drop": 0.01}}}},
     "a dlrm model (ranking) is not measured on recall"),
    ({"budget": {"metrics": {"auc[tail]": {"max_drop": 0.01}}}}, "unknown metric name"),
    ({"model": {"family": "custom"}}, "needs class_path"),
    ({"model": {"class_path": "a.b:C"}}, "class_path is for family 'custom' only"),
    # the class is imported and checked when the request is read, before any work
    ({"model": {"family": "custom", "class_path": "no_such_pkg.models:Net", "task": "ranking"}},
     "model.class_path: cannot import 'no_such_pkg.models'"),
    ({"model": {"family": "custom", "class_path": "os:system", "task": "ranking"}},
     "model.class_path: os:system is not a torch.nn.Module subclass"),
    ({"model": {"family": "custom", "class_path": "tests.user_models.shop_ranker:Nope",
                "task": "ranking"}},
     "module 'tests.user_models.shop_ranker' has no 'Nope'"),
    ({"model": {"family": "sasrec", "embedding_dim": 30, "heads": 4}},
     "heads (4) must divide embedding_dim (30)"),
    ({"model": {"family": "sasrec"}, "nas": {}}, "the search space is the DLRM ranker's"),
])
def test_requests_that_do_not_fit_the_model_are_refused_by_field(raw, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CompressionRequest.model_validate(raw)


def test_segment_and_main_budget_names_parse():
    budget = Budget(metrics={"main": {"max_drop": 0.001, "relative": True},
                             "auc[item_popularity=tail]": {"max_drop": 0.002},
                             "ndcg@20[user_type=new]": {"max_drop": 0.01}})
    from tasks.types import budget_ks

    assert budget_ks(budget.metrics) == (20,)


def test_user_model_class_must_be_an_installed_module():
    from tasks.userclass import user_class

    with pytest.raises(ValueError, match="cannot import 'no_such_pkg.models'"):
        user_class("no_such_pkg.models:Ranker")
    with pytest.raises(ValueError, match="is not a torch.nn.Module subclass"):
        user_class("os:system")
    assert user_class("tests.user_models.shop_ranker:ShopRanker").__name__ == "ShopRanker"


def test_ranker_quality_reports_sessions_and_segments(data):
    tables, ds = data
    test = to_arrays(tables["test"], ds)
    rng = np.random.default_rng(0)
    probs = np.clip(test.label * 0.3 + rng.random(len(test)) * 0.7, 0, 1)
    q, ll = quality("ranking", test, probs)
    assert {"auc", "ndcg@10", "auc[item_popularity=head]", "auc[user_type=new]"} <= set(q)
    assert q["auc"].ci_low < q["auc"].value < q["auc"].ci_high and ll > 0
    assert isinstance(test, Arrays) and test.groups is not None
