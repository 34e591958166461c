"""The plan graph is pure and content-keyed; the in-process executor runs it."""

from __future__ import annotations

import subprocess
import sys

from tasks.plan import plan
from tasks.types import (
    Candidate,
    CompressionRequest,
    DatasetRequest,
    DistillConfig,
    DlrmSpec,
    MixedPrecision,
    PruneConfig,
    QuantizeConfig,
    TrainConfig,
)

PRUNE = PruneConfig(method="structured", sparsity=0.5)


def _request(**update) -> CompressionRequest:
    fields = {"dataset": DatasetRequest(builtin="tiny"), "train": TrainConfig(epochs=1)}
    return CompressionRequest(**{**fields, **update}, candidates=(Candidate(id="p", plan=(PRUNE,)),
                    Candidate(id="p-q", plan=(PRUNE, QuantizeConfig())),
                    Candidate(id="mixed", plan=(QuantizeConfig(mixed_precision=MixedPrecision()),)),
                    Candidate(id="student", plan=(DistillConfig(student=DlrmSpec(
                        embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(16,))),))))


def test_the_plan_module_imports_nothing_heavy() -> None:
    code = ("import sys, tasks.plan; heavy = {'torch', 'ray', 'prefect', 'boto3', 'numpy'} & "
            "set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shared_prefixes_calibration_and_teachers_are_one_node_each() -> None:
    graph = plan(_request())
    ops = [n.op for n in graph.nodes.values()]
    # prune once (shared by p and p-q), its quantize, mixed, the student
    assert ops.count("stage") == 4
    assert ops.count("calibrate") == 1 and ops.count("evaluate") == 4
    # the baseline's logits: one teacher node for the pruning's fine-tuning and the student
    assert ops.count("teacher") == 1
    assert graph.candidates["p-q"].chain[:2] == graph.candidates["p"].chain[:2]
    mixed = graph.nodes[graph.candidates["mixed"].model]
    assert "calibration" in mixed.inputs and "teacher" not in mixed.inputs
    keys = list(graph.nodes)
    for i, node in enumerate(graph.nodes.values()):  # insertion order is topological
        assert all(keys.index(p) < i for p in node.parents)


def test_keys_are_content_only_and_change_downstream_of_a_change() -> None:
    a, b = plan(_request()), plan(_request())
    assert list(a.nodes) == list(b.nodes)  # same request, same keys (and order)
    assert plan(_request(), workers=3).candidates["p"].model == a.candidates["p"].model
    other = plan(_request(train=TrainConfig(epochs=1, seed=1)))
    assert other.dataset == a.dataset and other.baseline != a.baseline
    assert not set(other.nodes) & (set(a.nodes) - {a.dataset})
    # another reuse setting or resources: the same content
    assert plan(_request(reuse_results=False)).candidates["p-q"].model == \
        a.candidates["p-q"].model


def test_placement_deals_candidates_round_robin() -> None:
    graph = plan(_request(), workers=2)
    places = [graph.nodes[c.evaluation].placement for c in graph.candidates.values()]
    assert places == [0, 1, 0, 1]
    assert graph.nodes[graph.baseline].gpus == 1.0 and graph.nodes[graph.dataset].gpus == 0
