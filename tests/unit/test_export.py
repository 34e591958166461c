"""Serving exports (tasks.export): every family's compressed modules become a `torch.export`
program that a Python process without recsqueeze loads and runs, with the eager numbers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tasks.data import to_arrays
from tasks.export import (
    EXPORT_DIR,
    PROGRAM,
    SERVING,
    ExportError,
    describe_inputs,
    example_inputs,
    export_files,
    serving_export,
    serving_form,
)
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.modules import RowWiseQuantEmbedding
from tasks.modules.linear import DynamicInt8Linear, StaticInt8Linear
from tasks.modules.structural import SemiSparseLinear, SparseLinear
from tasks.modules.tt import QuantTTEmbedding, TTEmbedding
from tasks.stages import StageContext, apply_stage
from tasks.stages.calibrate import activation_table
from tasks.types import (
    DlrmSpec,
    FactorizeConfig,
    PruneConfig,
    QuantizeConfig,
    SasrecSpec,
    TwoTowerSpec,
)
from tests.serving_check import score_without_recsqueeze, write_inputs

FAMILIES = {"dlrm": DlrmSpec(embedding_dim=16, bottom_mlp=(32, 16), top_mlp=(64, 32)),
            "two_tower": TwoTowerSpec(), "sasrec": SasrecSpec(max_history=20)}
Q = QuantizeConfig
TT_INT4 = (FactorizeConfig(target="tt_embeddings", rank=8),
           Q(linear="int8_weight_only", embeddings="rowwise_int4"))
# each compressed module kind at least once; the families' own layouts (3D activations,
# the retrieval index) where they differ
PLANS = [
    ("dlrm", "dynamic_int8+rowwise_int8", (Q(),)),
    ("dlrm", "static_int8", ("calibrate", Q(linear="static_int8", embeddings="none"))),
    ("dlrm", "int4_weight_only/g16+rowwise_int2",
     (Q(linear="int4_weight_only", group_size=16, embeddings="rowwise_int2"),)),
    ("dlrm", "csr+pruned_rows", (PruneConfig(method="magnitude", sparsity=0.5),
                                 PruneConfig(method="embedding_rows", sparsity=0.5))),
    ("dlrm", "low_rank_tables", (FactorizeConfig(target="embeddings", rank=8),)),
    ("dlrm", "tt+int4_cores", TT_INT4),
    ("dlrm", "2:4", ("2:4",)),
    ("two_tower", "dynamic_int8+rowwise_int8", (Q(),)),
    ("two_tower", "tt+int8_cores", (FactorizeConfig(target="tt_embeddings", rank=8), Q())),
    ("sasrec", "dynamic_int8+rowwise_int4", (Q(embeddings="rowwise_int4"),)),
    ("sasrec", "tiered_int8_int2", (Q(linear="int8_weight_only", embeddings="tiered_int8_int2"),)),
    ("dlrm", "tiered_int4_int2", (Q(embeddings="tiered_int4_int2", head_share=0.3),)),
    ("sasrec", "static_int8", ("calibrate", Q(linear="static_int8", embeddings="none"))),
    ("sasrec", "fp16+structured", (PruneConfig(method="structured", sparsity=0.5),
                                   Q(linear="fp16", embeddings="fp16"))),
]


@pytest.fixture(scope="module")
def data():
    return generate("tiny", 0)


def _compressed(family: str, plan: tuple, data) -> tuple[nn.Module, object]:
    tables, data_spec = data
    spec = resolve(FAMILIES[family], data_spec)
    train, valid = (to_arrays(tables[s], data_spec, spec.problem_kind(), spec.history_width())
                    for s in ("train", "valid"))
    ctx = StageContext(calibration=lambda: valid, train_data=lambda: train, spec=spec,
                       max_relative_loss=0.01)
    model = build(spec, 0).eval()
    for stage in plan:
        if stage == "calibrate":
            # static int8 reads the activation ranges only (the sensitivity table: mixed)
            ranges = activation_table(model, valid.take(slice(0, 500)), 256)
            ctx = dataclasses.replace(ctx, activations=lambda r=ranges: r)
        elif stage == "2:4":  # the prune stage builds 2:4 on a GPU only; its CPU fallback
            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear and child.in_features % 4 == 0:
                        setattr(parent, name, SemiSparseLinear.from_linear(child))
        else:
            model = apply_stage(model, stage, ctx)
    return model.eval(), spec


@pytest.mark.parametrize(("family", "label", "plan"), PLANS, ids=[f"{f}-{n}" for f, n, _ in PLANS])
def test_every_family_and_stage_exports_with_the_eager_numbers(family, label, plan, data):
    model, spec = _compressed(family, plan, data)
    kinds = {type(m) for m in model.modules()}
    exported = serving_export(model, spec, data[1])
    # the serving form keeps no recsqueeze module that runs a fused or stateful kernel
    form_kinds = {type(m) for m in serving_form(model).modules()}
    assert not form_kinds & {RowWiseQuantEmbedding, DynamicInt8Linear, StaticInt8Linear,
                             TTEmbedding, QuantTTEmbedding}
    checked = exported.serving["checked"]
    assert checked["rows"] == 256
    # the int8 twins round as fbgemm does (x * (1/scale) + zero, fused multiply-adds): the same
    # numbers up to float summation order; a static int8 layer can differ by one output step
    # on a rounding tie
    tol = 0.05 if StaticInt8Linear in kinds else 1e-4 if DynamicInt8Linear in kinds else 1e-5
    assert checked["max_abs_diff_vs_eager"] <= tol, (label, checked)
    if label == "csr+pruned_rows":
        assert SparseLinear in kinds
    # a dynamic batch: one row runs the program checked on 256 (2000: the fresh-process test)
    program = torch.export.load(_saved(exported.program)).module()
    args = example_inputs(describe_inputs(spec, data[1]), 1, seed=1)
    with torch.no_grad():
        assert program(*args).shape == model(*args).shape


def _saved(program: bytes) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / PROGRAM
    path.write_bytes(program)
    return path


def test_serving_json_describes_inputs_in_the_dataset_column_order(data):
    model, spec = _compressed("dlrm", (Q(),), data)
    doc = serving_export(model, spec, data[1]).serving
    dense, sparse = doc["inputs"]
    assert dense["columns"] == list(data[1].dense)
    single = [c for c in data[1].categorical if c.multi_hot is None]
    assert sparse["columns"] == [c.name for c in single] + [
        f"recent_categories[{i}]" for i in range(5)]
    assert sparse["id_ranges"] == [c.cardinality for c in single] + [40] * 5
    assert sparse["pad"] == -1
    assert doc["output"]["shape"] == ["batch"] and doc["task"] == "ranking"
    seq, seq_spec = _compressed("sasrec", (), data)
    doc = serving_export(seq, seq_spec, data[1]).serving
    assert doc["inputs"][1]["pad"] == -1 and len(doc["inputs"][1]["columns"]) == 20
    assert doc["output"]["shape"][0] == "batch" and "top-K" in doc["output"]["meaning"]


class DataDependent(nn.Module):
    """A user layer torch.export cannot capture: Python control flow on a tensor's value."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.inner(x)
        return -self.inner(x)


def test_a_module_that_cannot_be_exported_is_named_and_the_promotion_says_why(data):
    model, spec = _compressed("dlrm", (Q(embeddings="rowwise_int4"),), data)
    model.top[0] = DataDependent(model.top[0])
    with pytest.raises(ExportError, match=r"module top\.0 \(DataDependent\)"):
        serving_export(model, spec, data[1])
    files, reason = export_files(model, spec, data[1])
    assert reason is not None and "top.0 (DataDependent)" in reason
    assert set(files) == {f"{EXPORT_DIR}/{SERVING}"}  # no program; serving.json says why
    assert json.loads(files[f"{EXPORT_DIR}/{SERVING}"])["error"] == reason


def test_the_program_runs_in_a_python_that_cannot_import_recsqueeze(data, tmp_path):
    """A fresh `python -I -S` with only the venv's site-packages on its path (no .pth files:
    the editable install of recsqueeze is not active): torch alone loads and scores."""
    rows = {}
    cases = {  # name: (family, plan); int8 activations -> the top-K check, else <= 1e-5
        "dlrm": ("dlrm", (Q(linear="int8_weight_only", embeddings="rowwise_int4"),)),
        "two_tower": ("two_tower", TT_INT4), "sasrec": ("sasrec", ()),
        "sasrec_int8": ("sasrec", (Q(),))}
    for name, (family, plan) in cases.items():
        model, spec = _compressed(family, plan, data)
        files, reason = export_files(model, spec, data[1])
        assert reason is None
        folder = tmp_path / name
        folder.mkdir()
        for path, body in files.items():
            (folder / path.split("/", 1)[1]).write_bytes(body)
        dense, sparse = example_inputs(describe_inputs(spec, data[1]), 2000, seed=2)
        write_inputs(folder, dense.numpy(), sparse.numpy())
        with torch.no_grad():
            rows[name] = model(dense, sparse).numpy()
    scores = score_without_recsqueeze([tmp_path / name for name in rows])
    for name, want in rows.items():
        got = scores[tmp_path / name]
        assert got.shape == want.shape
        if name == "sasrec_int8":
            # activations quantized per batch: a float-order difference of 1e-7 can move one
            # code by a step, so the scores may differ by that step's effect - not the ranking
            top = np.argsort(-got, 1)[:, :10] == np.argsort(-want, 1)[:, :10]
            assert top.mean() >= 0.999 and np.abs(got - want).mean() <= 1e-4, name
        else:
            assert np.abs(got - want).max() <= 1e-5, name
            if name != "dlrm":  # retrieval: the same top 10 items for every row
                assert (np.argsort(-got, 1)[:, :10] == np.argsort(-want, 1)[:, :10]).all()
