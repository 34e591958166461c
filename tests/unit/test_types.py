import json

import pytest
from pydantic import ValidationError

from tasks.types import (
    Budget,
    Candidate,
    CompressionRequest,
    DatasetRequest,
    MetricBudget,
    ModelSpec,
    QuantizeConfig,
)


@pytest.mark.parametrize("obj", [
    QuantizeConfig(), QuantizeConfig(linear="none"), QuantizeConfig(embeddings="none"),
    Budget(), ModelSpec(), DatasetRequest(builtin="small", seed=3),
    Candidate(id="a", plan=(QuantizeConfig(),)), CompressionRequest(),
])
def test_every_config_round_trips_through_json(obj):
    again = type(obj).model_validate_json(obj.model_dump_json())
    assert again == obj
    assert type(obj).model_validate(json.loads(json.dumps(obj.model_dump(mode="json")))) == obj


@pytest.mark.parametrize("raw, field", [
    ({"budget": {"metrics": {"auc": {"max_drop": -0.1}}}}, "max_drop"),
    ({"model": {"family": "resnet"}}, "model.family"),
    ({"dataset": {"builtin": None}}, "dataset"),
    ({"dataset": {"builtin": "huge"}}, "dataset.builtin"),
    ({"dataset": {"builtin": None, "uri": "/local/path"}}, "s3://"),
    ({"candidates": []}, "candidates"),
    ({"model_name": "Bad Name!"}, "model_name"),
])
def test_malformed_request_names_the_field(raw, field):
    with pytest.raises(ValidationError) as err:
        CompressionRequest.model_validate(raw)
    assert field in str(err.value)


def test_negative_budget_message_gives_value_and_fix():
    with pytest.raises(ValidationError, match=r"max_drop must be >= 0 \(got -0.1\)"):
        MetricBudget(max_drop=-0.1)


def test_quantize_that_does_nothing_is_refused():
    with pytest.raises(ValidationError, match="both 'none'"):
        QuantizeConfig(linear="none", embeddings="none")


def test_duplicate_candidate_ids_refused():
    c = Candidate(id="x", plan=(QuantizeConfig(),))
    with pytest.raises(ValidationError, match=r"duplicated: \['x'\]"):
        CompressionRequest(candidates=(c, c))


def test_request_schema_documents_every_field():
    schema = CompressionRequest.model_json_schema()
    props = schema["properties"]
    assert all("description" in p for p in props.values()), props


@pytest.mark.parametrize("raw, message", [
    ('{"budget": {"metrics": {"main": {"max_drop": NaN}}}}',
     "budget.metrics.main.max_drop must be a finite number (got nan)"),
    ('{"budget": {"metrics": {"main": {"max_drop": Infinity}}}}',
     "budget.metrics.main.max_drop must be a finite number (got inf)"),
    ('{"train": {"lr": Infinity}}', "train.lr must be a finite number (got inf)"),
    ('{"budget": {"metrics": {"auc[item_popularity=tail]": {"max_drop": -Infinity}}}}',
     "budget.metrics['auc[item_popularity=tail]'].max_drop must be a finite number (got -inf)"),
    ('{"candidates": [{"id": "p", "plan": [{"kind": "prune", "sparsity": NaN}]}]}',
     "candidates[0].plan[0].sparsity must be a finite number (got nan)"),
    ('{"model": {"family": "custom", "class_path": "a:B", "task": "ranking", '
     '"options": {"width": NaN}}}', "model.options.width must be a finite number (got nan)"),
    ('{"nas": {"max_wall_s": Infinity}}', "nas.max_wall_s must be a finite number (got inf)"),
    ('{"budget": {"metrics": {"main": {"max_drop": 1.5, "relative": true}}}}',
     "budget.metrics.main: max_drop is a fraction of the baseline's value when relative is "
     "true and must be < 1 (got 1.5); e.g. 0.001 = 0.1%"),
    ('{"budget": {"confidence": 1.0}}', "budget.confidence: Input should be less than 1"),
    ('{"budget": {"confidence": 0.5}}', "budget.confidence: Input should be greater than 0.5"),
])
def test_every_number_is_finite_and_meaningful_with_the_field_path(raw, message):
    from tasks.errors import explain

    with pytest.raises(ValidationError) as info:
        CompressionRequest.model_validate(json.loads(raw))  # Python's json reads NaN/Infinity
    text = explain(info.value)
    assert text.splitlines()[0].startswith(message), text
    assert len(text.splitlines()) == 1, text  # one error, not one per union member


def test_measurements_may_hold_nan():
    from tasks.types import Estimate

    assert Estimate(value=float("nan"), ci_low=0.0, ci_high=1.0).ci_low == 0.0


@pytest.mark.parametrize("raw, line", [
    ({"budjet": {}}, "budjet: unknown field; remove it or fix its name (allowed here: budget, "),
    ({"train": {"epoch": 1}}, "train.epoch: unknown field; remove it or fix its name (allowed "
                              "here: batch_size, epochs, lr, patience, seed, weight_decay)"),
    ({"budget": {"metrics": {"main": {"max_drop": 0.1, "rel": True}}}},
     "budget.metrics.main.rel: unknown field; remove it or fix its name (allowed here: "
     "max_drop, relative)"),
    ({"candidates": [{"id": "a", "plan": [{"kind": "prune", "amount": 0.5}]}]},
     "candidates[0].plan[0].amount: unknown field; remove it or fix its name (allowed here: "),
])
def test_an_unknown_field_is_named_with_the_fields_allowed_there(raw, line):
    from tasks.errors import explain

    with pytest.raises(ValidationError) as info:
        CompressionRequest.model_validate(raw)
    assert explain(info.value, CompressionRequest).splitlines()[0].startswith(line)
    if "prune" in str(raw):
        assert "sparsity" in explain(info.value, CompressionRequest)
