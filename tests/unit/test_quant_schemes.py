"""The quantization scheme registry (tasks/quant/schemes.py): every entry is a config value and a
mixed-precision choice, builds its module in every layer and round-trips through storage, and a
new entry is all a new dtype needs."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tasks.artifacts import deserialize_model, serialize_model
from tasks.evaluate import predict
from tasks.modules import HalfLinear
from tasks.quant.schemes import (
    EMBEDDING,
    EMBEDDING_SCHEMES,
    LINEAR,
    LINEAR_SCHEMES,
    BuildArgs,
    Scheme,
    embedding_scheme,
    linear_scheme,
)
from tasks.stages import StageContext, calibrate
from tasks.stages.calibrate import activation_table
from tasks.stages.context import NotApplicable
from tasks.stages.quantize import quantize, quantize_linear
from tasks.types import CalibrateConfig, MixedPrecision, QuantizeConfig


def test_name_tuples_are_the_registry_keys_and_import_without_torch():
    assert tuple(LINEAR) == LINEAR_SCHEMES and tuple(EMBEDDING) == EMBEDDING_SCHEMES
    assert all(LINEAR[n].name == n for n in LINEAR) and all(EMBEDDING[n].name == n for n in EMBEDDING)
    code = ("import sys, tasks.quant.schemes; "
            "print(sorted(m for m in ('torch', 'numpy', 'pyarrow', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # the types package reads it: nothing heavy


@pytest.mark.parametrize("name", LINEAR_SCHEMES)
def test_every_linear_scheme_is_a_config_value_the_config_agrees_with(name):
    scheme = LINEAR[name]
    cfg = QuantizeConfig(linear=name, embeddings="rowwise_int8")
    assert cfg.needs_calibration() == scheme.needs_ranges
    _mixed_takes_it_when_measured(scheme, linear_choices=("none", name))
    if scheme.group_wise:
        assert QuantizeConfig(linear=name, group_size=16).group_size == 16
    else:
        with pytest.raises(ValidationError, match="group_size"):
            QuantizeConfig(linear=name, group_size=16)


@pytest.mark.parametrize("name", EMBEDDING_SCHEMES)
def test_every_embedding_scheme_is_a_config_value_the_config_agrees_with(name):
    scheme = EMBEDDING[name]
    cfg = QuantizeConfig(linear="dynamic_int8", embeddings=name, row_range="minmax")
    assert ("/minmax" in cfg.label()) == scheme.row_range
    _mixed_takes_it_when_measured(scheme, embedding_choices=("none", name))


def _mixed_takes_it_when_measured(scheme, **choices):
    """Mixed precision chooses by the calibrated sensitivity: a dtype calibrate does not
    measure could never be picked, so it is refused by name rather than ignored."""
    if scheme.measured:
        assert scheme.name in MixedPrecision(**choices).model_dump_json()
    else:
        with pytest.raises(ValidationError, match=f"{scheme.name}.*no calibrated sensitivity"):
            MixedPrecision(**choices)


def _round_trips(model, q, spec, valid):
    blob = serialize_model(q, spec)
    assert len(blob) < len(serialize_model(model, spec))
    loaded, _ = deserialize_model(blob)
    p_q, p_loaded = predict(q, valid), predict(loaded, valid)
    assert np.isfinite(p_q).all() and (p_q == p_loaded).all()


@pytest.mark.parametrize("name", LINEAR_SCHEMES)
def test_every_linear_scheme_quantizes_every_layer_and_round_trips(tiny_dlrm, name):
    model, spec, valid, _ = tiny_dlrm
    rows = valid.take(slice(0, 500))
    ctx = StageContext(activations=lambda: activation_table(model, rows, 256))
    cfg = QuantizeConfig(linear=name, embeddings="none" if name != "none" else "rowwise_int8")
    q = quantize(model, cfg, ctx)
    scheme = LINEAR[name]
    linears = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears
    for path, layer in linears:
        expected = scheme.build(layer, scheme, BuildArgs(path, act_range=((-1.0, 1.0), (-1.0, 1.0))))
        assert type(q.get_submodule(path)) is type(expected), path
    _round_trips(model, q, spec, rows)


@pytest.mark.parametrize("name", EMBEDDING_SCHEMES)
def test_every_embedding_scheme_quantizes_every_table_and_round_trips(tiny_dlrm, name):
    model, spec, valid, _ = tiny_dlrm
    cfg = QuantizeConfig(linear="none" if name != "none" else "dynamic_int8", embeddings=name)
    q = quantize(model, cfg, StageContext(train_data=lambda: valid))  # tiered: counts lookups
    scheme = EMBEDDING[name]
    tables = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Embedding)]
    assert tables
    for path, table in tables:
        head = torch.arange(min(1, table.weight.shape[0] - 1))  # a tiered table's head ids
        built = scheme.build(table, scheme, BuildArgs(path, head=head))
        assert type(q.get_submodule(path)) is type(built), path
    _round_trips(model, q, spec, valid.take(slice(0, 500)))


@pytest.fixture
def bf16_measured(monkeypatch):
    """A throwaway Linear scheme (bf16 that calibrate measures, so mixed precision may pick it),
    registered for one test; it records the layers it built."""
    built: list[str] = []

    def build(layer, scheme, args):
        built.append(args.path)
        return HalfLinear.from_float(layer, "bf16")

    scheme = Scheme("test_bf16_measured", build, 16, half="bf16", measured=True)
    monkeypatch.setitem(LINEAR, scheme.name, scheme)
    return scheme, built


def test_a_new_registry_entry_is_all_quantize_calibrate_and_mixed_precision_need(tiny_dlrm,
                                                                                bf16_measured):
    model, spec, valid, _ = tiny_dlrm
    scheme, built = bf16_measured
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    tables = [p for p, m in model.named_modules() if isinstance(m, nn.Embedding)]
    # quantize: the config's Literal is built at import, so the test bypasses its validation
    q = quantize(model, QuantizeConfig.model_construct(linear=scheme.name, embeddings="none"),
                 StageContext())
    assert built == linears and all(isinstance(q.get_submodule(p), HalfLinear) for p in linears)
    # calibrate measures it for every Linear layer ...
    cal = calibrate(model, CalibrateConfig(rows=100, sensitivity_rows=1000),
                    StageContext(calibration=lambda: valid))
    measured = {r["module"] for r in cal.sensitivity.to_pylist() if r["choice"] == scheme.name}
    assert measured == set(linears)
    # ... so mixed precision can choose it (half the bytes of "none", and the budget is wide)
    mixed = MixedPrecision.model_construct(budget_fraction=1.0, embedding_choices=("none",),
                                           linear_choices=("none", scheme.name))
    ctx = StageContext(sensitivity=lambda: cal.sensitivity, max_relative_loss=10.0)
    q = quantize(model, QuantizeConfig.model_construct(mixed_precision=mixed), ctx)
    assert all(isinstance(q.get_submodule(p), HalfLinear) for p in linears)
    assert all(type(q.get_submodule(p)) is nn.Embedding for p in tables)  # "none" only
    _round_trips(model, q, spec, valid.take(slice(0, 500)))


def test_a_scheme_calibrate_measures_cannot_need_calibrated_ranges():
    with pytest.raises(ValueError, match="measured=True needs no calibrated ranges"):
        Scheme("bad", LINEAR["static_int8"].build, 8, needs_ranges=True, measured=True)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match=r"quantize.linear: unknown choice 'int3'.*int4_weight_only"):
        linear_scheme("int3")
    with pytest.raises(ValueError, match=r"quantize.embeddings: unknown choice 'x'.*rowwise_int2"):
        embedding_scheme("x")


def test_group_size_applies_to_group_wise_schemes_only():
    # a mixed-precision plan can give "none" or dynamic_int8 to a layer the group does not divide
    layer = nn.Linear(24, 4)
    assert quantize_linear(layer, "none", group_size=16, path="l") is layer
    assert quantize_linear(layer, "dynamic_int8", group_size=16, path="l") is not layer
    with pytest.raises(NotApplicable, match="group_size 16 does not divide the width 24 of layer l"):
        quantize_linear(layer, "int8_weight_only", group_size=16, path="l")


def test_static_int8_without_ranges_names_the_layer():
    with pytest.raises(ValueError, match="static_int8 needs calibrated ranges for top.0"):
        quantize_linear(nn.Linear(8, 4), "static_int8", path="top.0")
