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
