"""The model protocol: what each family offers, what a bare model needs, and no import cycle
among the training and evaluation modules."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Protocol

import numpy as np
import pytest
import torch
from torch import nn

from tasks import protocol as p
from tasks.data import to_arrays
from tasks.evaluate import predict
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.objectives import in_batch
from tasks.train import train
from tasks.types import DlrmSpec, SasrecSpec, TrainConfig, TwoTowerSpec

CAPABILITIES = (p.NormalizesDense, p.HasCatalogue, p.CountsItems, p.ScoresItems,
                p.InBatchNegatives, p.CorrectsSamplingBias, p.HasDerivedIndex)
OFFERS = {
    "dlrm": {p.NormalizesDense},
    "two_tower": {p.HasCatalogue, p.CountsItems, p.ScoresItems, p.InBatchNegatives,
                  p.CorrectsSamplingBias, p.HasDerivedIndex},
    "sasrec": {p.ScoresItems},  # scores chosen items, but trains by softmax over the catalogue
}
SPECS = {"dlrm": DlrmSpec(embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(16,)),
         "two_tower": TwoTowerSpec(embedding_dim=8, tower_mlp=(16,)),
         "sasrec": SasrecSpec(embedding_dim=8, heads=2, layers=1, ffn_dim=16)}


@pytest.fixture(scope="module")
def data():
    return generate("tiny", 0)


def _members(proto: type) -> set[str]:
    """The members a Protocol declares (its own and its protocol bases')."""
    out: set[str] = set()
    for cls in proto.__mro__:
        if cls in (Protocol, object) or not getattr(cls, "_is_protocol", False):
            continue
        out |= {n for n in (*vars(cls), *getattr(cls, "__annotations__", {}))
                if not n.startswith("_")}
    return out


@pytest.mark.parametrize("family", sorted(OFFERS))
def test_each_family_offers_its_capabilities_where_python_3_12_looks(data, family):
    """isinstance against a runtime Protocol reads members with inspect.getattr_static from
    Python 3.12 on, which misses nn.Module's buffers and submodules: every capability a family
    offers must be found that way too."""
    model = build(resolve(SPECS[family], data[1]))
    assert isinstance(model, p.RecModel) and p.problem_kind(model) == SPECS[family].problem_kind()
    assert {c for c in CAPABILITIES if isinstance(model, c)} == OFFERS[family]
    for capability in OFFERS[family] | {p.RecModel}:
        for name in _members(capability):
            inspect.getattr_static(model, name)  # raises AttributeError if only __getattr__ has it
    attention = [m for m in model.modules() if p.attention_projections(m) is not None]
    assert len(attention) == (1 if family == "sasrec" else 0)
    assert in_batch(model) == (family == "two_tower")


class _Bare(nn.Module):
    """A user's ranker with nothing but forward and the spec build gives it."""

    def __init__(self, spec) -> None:
        super().__init__()
        self.spec = spec
        self.table = nn.Embedding(spec.tables[0].rows, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.out(self.table(sparse[:, 0])).squeeze(1)


def test_a_model_with_only_forward_and_spec_trains_and_predicts(data):
    tables, ds = data
    spec = resolve(SPECS["dlrm"], ds)
    tr, te = (to_arrays(tables[s], ds) for s in ("train", "test"))
    model = _Bare(spec)
    assert not any(isinstance(model, c) for c in CAPABILITIES)
    train(model, tr.take(slice(0, 2000)), TrainConfig(epochs=1, batch_size=512))
    probs = predict(model, te)
    assert probs.shape == (len(te),) and np.all((probs > 0) & (probs < 1))


def test_a_module_without_a_spec_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"Linear has no `spec`: build models with "
                                        r"tasks.models.build\(spec\)"):
        p.problem_kind(nn.Linear(2, 1))


ROOT = Path(__file__).resolve().parents[2]
MINE = {"tasks.train", "tasks.objectives", "tasks.quality", "tasks.evaluate", "tasks.protocol",
        "tasks.determinism"}


def _imports(path: Path) -> set[str]:
    """Every tasks.* module a file imports, at the top or inside a function, with the packages
    that importing it runs (`tasks.stages.context` runs tasks/stages/__init__.py)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    parents = {m.rsplit(".", k)[0] for m in out for k in range(1, m.count("."))}
    return {m for m in out | parents if m.startswith("tasks.")}


def test_no_import_cycle_through_training_and_evaluation():
    """train -> objectives -> ... never leads back (function-local imports count)."""
    files = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (ROOT / "tasks").rglob("*.py")}
    graph = {name: {m for m in _imports(f) if m in files} for name, f in files.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(graph.get(m, ()))
        return False

    assert [m for m in sorted(MINE) if reaches(m, m)] == []
    assert "tasks.train" not in graph["tasks.objectives"]
