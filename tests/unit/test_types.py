import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from tasks.types import (
    Budget,
    Candidate,
    CompressionRequest,
    CustomSpec,
    DatasetRequest,
    DistillConfig,
    DlrmSpec,
    MetricBudget,
    QuantizeConfig,
    SasrecSpec,
    TableSpec,
    TwoTowerSpec,
    parse_model_spec,
)

SHOP_RANKER = "tests.user_models.shop_ranker:ShopRanker"
SPECS = [DlrmSpec(), DlrmSpec(embedding_dim=8, table_dims={"user_id": 4}, interaction="cat"),
         TwoTowerSpec(tower_mlp=(64, 32), temperature=0.1), SasrecSpec(layers=1, heads=4),
         CustomSpec(class_path=SHOP_RANKER, task="next_item", options={"hidden": 8},
                    max_history=30)]


@pytest.mark.parametrize("obj", [
    QuantizeConfig(), QuantizeConfig(linear="none"), QuantizeConfig(embeddings="none"),
    Budget(), *SPECS, DatasetRequest(builtin="small", seed=3),
    Candidate(id="a", plan=(QuantizeConfig(),)), CompressionRequest(),
    *(CompressionRequest(model=spec) for spec in SPECS),
    DistillConfig(student=TwoTowerSpec(embedding_dim=16)),
])
def test_every_config_round_trips_through_json(obj):
    again = type(obj).model_validate_json(obj.model_dump_json())
    assert again == obj and type(again) is type(obj)
    assert type(obj).model_validate(json.loads(json.dumps(obj.model_dump(mode="json")))) == obj


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.family)
def test_a_model_spec_comes_back_as_its_familys_class(spec):
    resolved = spec.model_copy(update={"tables": (TableSpec(name="item_id", rows=9),),
                                       "item_table": "item_id"})
    for obj in (spec, resolved):
        again = parse_model_spec(obj.model_dump_json())
        assert again == obj and type(again) is type(obj)
        assert CompressionRequest(model=obj.model_dump(mode="json")).model == obj
    # the dataset fields are written once resolved, and left out before (a request's JSON is
    # what the form accepts)
    assert "tables" in resolved.model_dump() and "tables" not in spec.model_dump()


def test_a_model_without_family_is_a_ranker():
    assert type(CompressionRequest.model_validate({"model": {"embedding_dim": 8}}).model) \
        is DlrmSpec
    assert parse_model_spec({"top_mlp": [4]}) == DlrmSpec(top_mlp=(4,))


def test_a_spec_stored_before_the_union_still_loads():
    # before families were classes, every spec carried every family's fields
    legacy = {"family": "sasrec", "embedding_dim": 16, "bottom_mlp": [128, 64],
              "top_mlp": [256, 128], "tables": [{"name": "item_id", "rows": 50}], "num_dense": 0,
              "table_dims": {}, "interaction": "dot", "tower_mlp": [128], "temperature": 0.05,
              "layers": 1, "heads": 2, "ffn_dim": 32, "max_history": 12, "dropout": 0.1,
              "item_table": "item_id", "item_feature_tables": [], "task": None,
              "class_path": None, "options": {}}
    spec = parse_model_spec(json.dumps(legacy))
    assert spec == SasrecSpec(embedding_dim=16, layers=1, ffn_dim=32, max_history=12,
                              tables=(TableSpec(name="item_id", rows=50),), item_table="item_id")
    assert spec.history_width() == 12 and spec.problem_kind() == "next_item"
    with pytest.raises(ValidationError, match="model.bottom_mlp is for family 'dlrm' only"):
        CompressionRequest.model_validate({"model": legacy})  # a request stays strict


@pytest.mark.parametrize("raw, line", [
    ({"model": {"family": "resnet"}}, "model.family: 'resnet' is not a model family; set family "
     "to one of dlrm, two_tower, sasrec, custom (left out: dlrm)"),
    ({"model": {"layers": 3}}, "model: model.layers is for family 'sasrec' only (family is "
     "'dlrm'); remove it or set family to 'sasrec'"),
    ({"model": {"family": "two_tower", "max_history": 3}}, "model: model.max_history is for "
     "family 'sasrec' or 'custom' only (family is 'two_tower'); remove it or set family to "
     "'sasrec' or 'custom'"),
    ({"model": {"family": "sasrec", "heads": 0}},
     "model.heads: Input should be greater than or equal to 1 (got 0)"),
    ({"model": {"family": "sasrec", "layerz": 1}}, "model.layerz: unknown field; remove it or "
     "fix its name (allowed here: dropout, embedding_dim, family, ffn_dim, heads, layers, "
     "max_history)"),
    ({"model": {"family": "custom", "task": "ranking"}}, "model: family 'custom' needs "
     "class_path ('package.module:Class') and task (ranking | retrieval | next_item)"),
    ({"candidates": [{"id": "a", "plan": [{"kind": "distill", "student": {"top_mlp": [0]}}]}]},
     "candidates[0].plan[0].student.top_mlp: MLP widths must be > 0 (got (0,))"),
])
def test_a_bad_model_field_is_named_with_its_fix(raw, line):
    from tasks.errors import explain

    with pytest.raises(ValidationError) as info:
        CompressionRequest.model_validate(raw)
    assert explain(info.value, CompressionRequest) == line


def _resolve_ref(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def test_the_run_form_shows_one_familys_fields():
    """The compress flow's parameter schema, built as a deployment builds it (no server)."""
    from prefect.utilities.callables import parameter_schema

    from flows.compress import compress

    schema = parameter_schema(compress).model_dump_for_openapi()
    request = _resolve_ref(schema, schema["properties"]["request"])
    model = request["properties"]["model"]
    choices = [_resolve_ref(schema, m) for m in model.get("oneOf") or model["anyOf"]]
    families = {}
    for member in choices:
        family = member["properties"]["family"]
        values = family.get("enum") or [family["const"]]
        assert len(values) == 1, family
        families[values[0]] = set(member["properties"])
    assert set(families) == {"dlrm", "two_tower", "sasrec", "custom"}
    assert {"bottom_mlp", "top_mlp", "table_dims"} <= families["dlrm"]
    assert {"layers", "heads", "max_history"} <= families["sasrec"]
    assert {"tower_mlp", "temperature"} <= families["two_tower"]
    assert {"class_path", "task", "options"} <= families["custom"]
    assert not {"layers", "tower_mlp", "class_path", "task"} & families["dlrm"]
    assert not {"bottom_mlp", "top_mlp", "tower_mlp", "class_path"} & families["sasrec"]
    for fields in families.values():
        assert "embedding_dim" in fields
        assert not {"tables", "num_dense", "item_table", "item_feature_tables"} & fields
    for member in choices:  # every field described, for the form
        assert all("description" in p for p in member["properties"].values()), member


def test_the_server_accepts_a_requests_json_and_only_its_family():
    """What Prefect's API checks a REST-created run's parameters against: exactly one member
    matches a request's JSON (a dumped request included), and the internal fields are refused."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    from flows.compress import compress

    schema = parameter_schema(compress).model_dump_for_openapi()

    def errors(model: dict) -> list:
        return validate({"request": {"model": model}}, schema)

    for spec in SPECS:
        assert errors(spec.model_dump(mode="json")) == [], spec
    assert errors({}) == [] and errors({"embedding_dim": 8}) == []  # no family: dlrm
    assert errors({"family": "sasrec", "layers": 1}) == []
    assert errors({"family": "resnet"}) and errors({"family": "dlrm", "layers": 1})
    assert errors({"family": "dlrm", "tables": []})


def test_types_import_nothing_heavy_and_no_cycle():
    # tasks.defaults first: the order that would meet a half-made tasks.types in a cycle
    code = ("import sys, tasks.defaults, tasks.types; from tasks.types import CompressionRequest; "
            "CompressionRequest(); assert not {'torch', 'ray', 'prefect', 'boto3'} & "
            "set(sys.modules), sorted(sys.modules)")
    for first in ("import tasks.defaults", "import tasks.types", "import tasks.types.request"):
        subprocess.run([sys.executable, "-c", f"{first}; {code}"], check=True)


@pytest.mark.parametrize("raw, field", [
    ({"budget": {"metrics": {"auc": {"max_drop": -0.1}}}}, "max_drop"),
    ({"model": {"family": "resnet"}}, "model.family"),
    ({"model": {"family": "sasrec", "bottom_mlp": [8]}}, "model.bottom_mlp"),
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
    ({"budjet": {}}, "budjet: unknown field; remove it or fix its name (allowed here: baseline, budget, "),
    ({"train": {"epoch": 1}}, "train.epoch: unknown field; remove it or fix its name (allowed "
                              "here: batch_size, embedding_l2, epochs, lr, min_steps, patience, "
                              "seed, weight_decay)"),
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
