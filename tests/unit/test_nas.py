"""NAS: the space, the strategies, the Pareto front, and trial architectures that train."""

import json
import random

import pytest
import torch

from tasks.artifacts import deserialize_model, serialize_model
from tasks.data import to_arrays
from tasks.evaluate import predict, stored_elements
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.nas import Search, mutate, pareto, sample
from tasks.stages import StageContext, apply_stage
from tasks.types import DlrmSpec, NASRequest, NASSpace, NASTrialConfig, QuantizeConfig
from tests.unit.test_gate import result

SPACE = NASSpace()


@pytest.fixture(scope="module")
def data():
    tables, spec = generate("tiny", 0)
    return spec, *(to_arrays(tables[s], spec) for s in ("train", "valid"))


def test_samples_are_valid_models_with_per_table_widths_and_both_interactions(data):
    spec, train, _ = data
    tables = resolve(DlrmSpec(), spec).tables
    rng = random.Random(0)
    specs = [sample(SPACE, tables, rng) for _ in range(30)]
    assert {s.interaction for s in specs} == {"dot", "cat"}
    big = {t.name for t in tables if t.rows >= SPACE.large_table_rows}
    assert all(set(s.table_dims) == big for s in specs)
    for s in specs[:6]:
        model = build(resolve(s, spec))
        out = model(torch.from_numpy(train.dense[:8]), torch.from_numpy(train.sparse[:8]))
        assert out.shape == (8,)


def test_mutation_changes_one_gene():
    tables = resolve(DlrmSpec(), generate("tiny", 0)[1]).tables
    rng = random.Random(1)
    for _ in range(40):
        parent = sample(SPACE, tables, rng)
        child = mutate(parent, SPACE, tables, rng)
        changed = [f for f in ("embedding_dim", "top_mlp", "interaction", "table_dims")
                   if getattr(child, f) != getattr(parent, f)]
        assert len(changed) <= 1 and child.bottom_mlp[-1] == child.embedding_dim


def test_search_never_repeats_and_evolves_from_the_population():
    tables = resolve(DlrmSpec(), generate("tiny", 0)[1]).tables
    search = Search(NASRequest(strategy="evolution", population=4, tournament=2), tables)
    seen = set()
    for _ in range(4):
        specs = search.propose(3)
        assert len(specs) == 3
        for s in specs:
            key = json.dumps(s.model_dump(mode="json"), sort_keys=True)
            assert key not in seen
            seen.add(key)
            search.tell(s, float(s.embedding_dim))  # fitness: wider is better, say
    assert len(search.population) == 4  # regularized: the oldest left


def test_pareto_front_over_auc_size_and_latency():
    a = result("a", 10, 0.0, 0.0, p99=2.0)   # best AUC
    b = result("b", 5, 0.001, 0.002, p99=2.0)  # smaller
    c = result("c", 12, 0.002, 0.003, p99=3.0)  # dominated by a
    d = result("d", 10, 0.001, 0.002, p99=1.0)  # faster
    assert {r.candidate.id for r in pareto([a, b, c, d])} == {"a", "b", "d"}


def test_nas_trial_trains_within_its_step_budget_and_chains(data):
    spec, train, valid = data
    teacher = build(resolve(DlrmSpec(embedding_dim=16, bottom_mlp=(32, 16), top_mlp=(32,)),
                            spec))
    ctx = StageContext(calibration=lambda: valid, train_data=lambda: train,
                       spec=resolve(DlrmSpec(embedding_dim=16, bottom_mlp=(32, 16),
                                              top_mlp=(32,)), spec))
    student = DlrmSpec(embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(16,), interaction="cat",
                        table_dims={"user_id": 4})
    model = apply_stage(teacher, NASTrialConfig(student=student, steps=20, batch_size=256), ctx)
    assert model.spec.table_dims == {"user_id": 4} and "0" in model.projections
    assert stored_elements(model) < stored_elements(teacher)
    loaded, _ = deserialize_model(serialize_model(model, model.spec))
    assert (predict(loaded, valid) == predict(model, valid)).all()
    q = apply_stage(model, QuantizeConfig(), ctx)  # a NAS result compresses further
    assert len(serialize_model(q, model.spec)) < len(serialize_model(model, model.spec))


def test_bad_table_dims_are_refused(data):
    spec, *_ = data
    with pytest.raises(ValueError, match="table_dims names tables the data does not have"):
        build(resolve(DlrmSpec(table_dims={"nope": 4}), spec))
    with pytest.raises(ValueError, match=r"table_dims must be in \(0, 1024\]"):
        DlrmSpec(table_dims={"user_id": 0})


def test_regularized_evolution_starts_from_a_random_population_and_ages_out_the_oldest(
        monkeypatch):
    """Real et al. (2019): `population` random members first; then every child is a mutation
    of a tournament winner, and the oldest member dies - even the fittest one."""
    import tasks.nas as nas

    tables = resolve(DlrmSpec(), generate("tiny", 0)[1]).tables
    calls = {"mutate": 0}
    real_mutate = nas.mutate

    def counting(*args, **kw):
        calls["mutate"] += 1
        return real_mutate(*args, **kw)

    monkeypatch.setattr(nas, "mutate", counting)
    search = Search(NASRequest(strategy="evolution", population=5, tournament=2, seed=3), tables)
    first = search.propose(3)  # nothing told yet: random
    for i, spec in enumerate(first):
        search.tell(spec, 10.0 if i == 0 else float(i))  # the first member is by far the best
    second = search.propose(2)  # 3 of 5 members: still random
    assert calls["mutate"] == 0
    for spec in second:
        search.tell(spec, 0.0)
    assert len(search.population) == 5
    search.propose(1)  # a full population: now children are mutations
    assert calls["mutate"] >= 1
    search.tell(sample(SPACE, tables, random.Random(9)), -1.0)
    members = [s for s, _ in search.population]
    assert len(members) == 5 and first[0] not in members  # the oldest aged out, fit or not
    assert members[0] == first[1]
