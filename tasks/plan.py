"""The plan graph: a `CompressionRequest` as a deduplicated DAG of content-keyed nodes.

Pure (no Prefect, Ray or boto3). A node's key is the sha256 of its parents' keys, its
operation and its config's canonical JSON, so it names what the node computes and nothing
about where or how fast: two plans that share a prefix share its nodes, and the key is the
result cache's key (with the code digest). The executors (`tasks.execute` in one process,
`flows.execute` on Prefect + Ray) run the same nodes through the same task functions.

    dataset -> baseline -> evaluate_baseline
                   |-> calibrate --------------.
                   |-> teacher (ranking) ------+-> stage -> stage ... -> evaluate (per candidate)
    evaluations (+ champion) -> timing -> gate        (the sinks; the gate runs in the driver)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

from tasks.types import (
    DEFAULT_KS,
    Candidate,
    CompressionRequest,
    DistillConfig,
    FactorizeConfig,
    NASTrialConfig,
    PruneConfig,
    QuantizeConfig,
    StageConfig,
    budget_ks,
)
from tasks.types.record import ImportRecord

Op = Literal["dataset", "baseline", "evaluate_baseline", "calibrate", "teacher", "stage",
             "evaluate", "validate"]


def canonical(value: BaseModel | dict[str, object] | None) -> str:
    """JSON with sorted keys and no spaces: equal configs, equal text."""
    data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Node:
    """One computation of the plan: what it does (`op`, `value`, `config` = the canonical JSON
    its key covers), what it reads (`inputs`: argument name -> node key), where it would
    like to run (`gpus`, `placement`)."""

    key: str
    op: Op
    inputs: dict[str, str]
    value: BaseModel | None
    config: str
    label: str
    cpus: float = 1.0
    gpus: float = 0.0  # wanted; an executor grants it only where the cluster has GPUs
    placement: int | None = None  # worker index (round-robin over candidates); None: anywhere

    @property
    def parents(self) -> tuple[str, ...]:
        return tuple(self.inputs.values())


@dataclass(frozen=True)
class CandidatePlan:
    candidate: Candidate
    chain: tuple[str, ...]  # every node it waits for, in order (calibrate, teacher, stages)
    model: str  # the key of its last stage
    evaluation: str


def needs_teacher(stage: StageConfig) -> bool:
    """Whether the stage reads its input model's logits on the train rows (ranking models)."""
    if isinstance(stage, DistillConfig):
        return stage.teacher == "input"
    if isinstance(stage, NASTrialConfig):
        return True
    if isinstance(stage, (PruneConfig, FactorizeConfig)):
        return stage.finetune_epochs > 0 and stage.finetune_target == "teacher"
    if isinstance(stage, QuantizeConfig):  # quantization-aware fine-tuning fits its input
        return stage.finetune_epochs > 0
    return False


@dataclass
class Graph:
    """The plan of one request; `add_candidate` extends it (NAS, recipe search)."""

    request: CompressionRequest
    workers: int = 1
    nodes: dict[str, Node] = field(default_factory=dict)  # insertion order is a topological one
    candidates: dict[str, CandidatePlan] = field(default_factory=dict)
    ks: tuple[int, ...] = DEFAULT_KS
    imported: ImportRecord | None = None  # the baseline, when the run compresses an import

    def add(self, op: Op, inputs: dict[str, str], value: BaseModel | None,
            extra: dict[str, object], label: str, gpus: float = 0.0,
            placement: int | None = None) -> str:
        """The node's key; a node equal in content to one already planned is that node."""
        config = canonical({"value": canonical(value) if value is not None else None, **extra})
        key = hashlib.sha256(json.dumps([op, sorted(inputs.items()), config]).encode()).hexdigest()
        if key not in self.nodes:
            self.nodes[key] = Node(key, op, inputs, value, config, label,
                                   self.request.resources.cpus_per_stage, gpus, placement)
        return key

    @property
    def dataset(self) -> str:
        return self.add("dataset", {}, self.request.dataset, {}, "dataset")

    @property
    def baseline(self) -> str:
        r = self.request
        if self.imported is not None:  # loaded and checked against the dataset, not trained
            return self.add("baseline", {"dataset": self.dataset}, self.imported, {},
                            "baseline (imported)")
        return self.add("baseline", {"dataset": self.dataset}, r.train,
                        {"model": canonical(r.model)}, "baseline",
                        gpus=r.resources.gpus_per_stage)

    @property
    def baseline_evaluation(self) -> str:
        return self.add("evaluate_baseline", {"built": self.baseline, "dataset": self.dataset},
                        self.request.budget, {"ks": list(self.ks)}, "evaluate baseline")

    @property
    def calibration(self) -> str | None:
        r = self.request
        if not any(s.needs_calibration() for c in r.candidates for s in c.plan) and \
                not (r.search is not None and r.search.warm_start) and \
                not any(s.needs_calibration() for c in self.candidates.values()
                        for s in c.candidate.plan):
            return None
        return self.add("calibrate", {"built": self.baseline, "dataset": self.dataset},
                        r.calibrate, {}, "calibrate")

    def teacher(self, model: str) -> str:
        """The logits of `model` on the train rows, computed once for every stage reading them."""
        return self.add("teacher", {"built": model, "dataset": self.dataset}, None, {},
                        "teacher outputs")

    def add_chain(self, stages: tuple[StageConfig, ...], placement: int | None = None,
                  ) -> tuple[list[str], list[str]]:
        """The nodes of `stages` applied in order to the baseline (a prefix shared with another
        plan is the same node): (each stage's key, every key the chain waits for in order)."""
        r = self.request
        ranking = r.model.problem_kind() == "ranking"
        parent, chain, stage_keys = self.baseline, [], []
        for stage in stages:
            inputs = {"parent": parent, "dataset": self.dataset}
            calibration = self.calibration if stage.needs_calibration() else None
            if calibration is not None:
                inputs["calibration"] = calibration
            if ranking and needs_teacher(stage):
                inputs["teacher"] = self.teacher(parent)
            chain.extend(k for name, k in inputs.items() if name in ("calibration", "teacher"))
            parent = self.add("stage", inputs, stage,
                              {"seed": r.train.seed, "budget": canonical(r.budget)},
                              stage.label(), gpus=r.resources.gpus_per_stage,
                              placement=placement)
            chain.append(parent)
            stage_keys.append(parent)
        return stage_keys, list(dict.fromkeys(chain))

    def add_candidate(self, cand: Candidate, placement: int | None = None) -> CandidatePlan:
        """The candidate's stages and its evaluation. Placement deals candidates round-robin
        over the workers by default."""
        r = self.request
        if placement is None:
            placement = len(self.candidates) % max(self.workers, 1)
        stages, chain = self.add_chain(cand.plan, placement)
        evaluation = self.add(
            "evaluate", {"built": stages[-1], "dataset": self.dataset, "baseline": self.baseline,
                         "baseline_evaluation": self.baseline_evaluation},
            cand, {"confidence": r.budget.confidence, "ks": list(self.ks)},
            f"evaluate {cand.id}", placement=placement)
        planned = CandidatePlan(cand, tuple(chain), stages[-1], evaluation)
        self.candidates[cand.id] = planned
        return planned

    def validation(self, model: str, rows: int | None, latency_seconds: float = 0.0) -> str:
        """`model` scored on the valid split (its first `rows`) against the baseline: a
        search's score of a trial or of a trial's prefix (never the test split)."""
        return self.add("validate", {"built": model, "dataset": self.dataset,
                                     "baseline": self.baseline}, None,
                        {"rows": rows, "latency_seconds": latency_seconds}, "validate")


def plan(request: CompressionRequest, workers: int = 1,
         imported: ImportRecord | None = None) -> Graph:
    """The request's graph: data, baseline and its evaluation, calibration where a plan needs
    it, every candidate's stages and evaluation. `workers` is how many nodes placement hints
    spread candidates over; `imported` is the baseline when the request names one
    (`tasks.modelimport.baseline_source`)."""
    if (request.baseline is None) != (imported is None):
        raise ValueError("plan: a request that names a baseline is planned with its import "
                         "record (tasks.modelimport.baseline_source), and only then")
    ks = tuple(sorted({*DEFAULT_KS, *budget_ks(request.budget.metrics)}))
    graph = Graph(request, workers, ks=ks, imported=imported)
    graph.baseline_evaluation  # noqa: B018 (adds the node and its ancestors)
    for cand in request.candidates:
        graph.add_candidate(cand)
    return graph
