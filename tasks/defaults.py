"""The default-candidate policy: what a request that names no candidates or budget gets, per
model family. Policy, not a type: it lives beside the plan and imports only the types it
builds (tasks.types.request fills a request's defaults from here)."""

from __future__ import annotations

from tasks.types.budget import Budget, MetricBudget
from tasks.types.model import DlrmSpec, SasrecSpec, TwoTowerSpec
from tasks.types.search import RecipeSearch, SearchSpace
from tasks.types.stages import (
    Candidate,
    DistillConfig,
    FactorizeConfig,
    MixedPrecision,
    PruneConfig,
    QuantizeConfig,
)

RANK_FAMILIES_MAX_DROP = 0.01
"""Default relative budget of two_tower and sasrec: on `small` their main metrics (Recall@50,
NDCG@10 over ~35,000 clicked test rows) resolve about 0.6% (docs/baseline_checks.py); 0.1%
would need over a million test rows."""


def default_budget(family: str = "dlrm") -> Budget:
    """The family's default budget: its main metric may drop 0.1% relative (ranker, custom)
    or 1% (retrieval and next-item models)."""
    if family in ("two_tower", "sasrec"):
        return Budget(metrics={"main": MetricBudget(max_drop=RANK_FAMILIES_MAX_DROP,
                                                    relative=True)})
    return Budget()


def default_candidates(family: str = "dlrm") -> tuple[Candidate, ...]:
    """One or two plans per stage kind for the model family: quantization, pruning,
    distillation, factorization (for the ranker, the tensor-train chain is the smallest passing
    candidate in docs/benchmarks.md). A user's own model gets the stages that need no
    knowledge of its architecture: quantization of its Linear layers and tables."""
    tt = FactorizeConfig(target="tt_embeddings", rank=32, finetune_epochs=3, finetune_lr=3e-3)
    int8 = QuantizeConfig(linear="int8_weight_only", embeddings="rowwise_int8")
    if family == "two_tower":
        student = TwoTowerSpec(embedding_dim=32, tower_mlp=(64,))
        return (
            Candidate(id="int8-all", plan=(int8,)),
            Candidate(id="int4-emb", plan=(QuantizeConfig(linear="int8_weight_only",
                                                          embeddings="rowwise_int4"),)),
            Candidate(id="pruned-int8", plan=(PruneConfig(method="structured"), int8)),
            Candidate(id="lowrank-emb", plan=(FactorizeConfig(target="embeddings", rank=16),)),
            Candidate(id="student-half", plan=(DistillConfig(student=student),)),
            Candidate(id="tt-int8", plan=(tt, int8)),
        )
    if family == "sasrec":
        student = SasrecSpec(layers=1, heads=1)
        return (
            Candidate(id="int8-all", plan=(int8,)),
            Candidate(id="dyn-int8", plan=(QuantizeConfig(embeddings="none"),)),
            Candidate(id="int4-emb", plan=(QuantizeConfig(linear="int8_weight_only",
                                                          embeddings="rowwise_int4"),)),
            Candidate(id="pruned-heads-ffn", plan=(PruneConfig(method="structured"),)),
            Candidate(id="lowrank-attn-ffn", plan=(FactorizeConfig(target="linear", rank=16),)),
            Candidate(id="student-1layer", plan=(DistillConfig(student=student),)),
        )
    if family == "custom":
        return (
            Candidate(id="int8-all", plan=(int8,)),
            Candidate(id="int8-emb", plan=(QuantizeConfig(linear="none"),)),
            Candidate(id="int4-emb", plan=(QuantizeConfig(linear="none",
                                                          embeddings="rowwise_int4"),)),
        )
    half = DlrmSpec(embedding_dim=32, bottom_mlp=(128, 32), top_mlp=(128, 64))
    return (
        Candidate(id="int8-all", plan=(QuantizeConfig(),)),
        Candidate(id="int8-emb", plan=(QuantizeConfig(linear="none"),)),
        Candidate(id="int4-emb", plan=(QuantizeConfig(embeddings="rowwise_int4"),)),
        Candidate(id="mixed", plan=(QuantizeConfig(mixed_precision=MixedPrecision()),)),
        Candidate(id="pruned-int8", plan=(PruneConfig(method="structured", sparsity=0.5),
                                          QuantizeConfig())),
        Candidate(id="student-half", plan=(DistillConfig(student=half),)),
        Candidate(id="tt-int8", plan=(tt, QuantizeConfig(linear="int8_weight_only"))),
    )


def default_search(family: str = "dlrm") -> RecipeSearch | None:
    """The recipe search a request gets unless it sets `search` (null: none): a small trial
    budget (6 trials, 2 at a time, one-epoch students) that `make demo` can afford on 2 cores;
    raise `trials` for a nightly run. A user's own class gets none (no student of it can be
    built, and its tables' layout is its own)."""
    if family == "custom":
        return None
    dims = (16, 32) if family == "dlrm" else (32, 48)
    return RecipeSearch(trials=6, parallelism=2, front=2, latency_seconds=2.0, space=SearchSpace(
        student_dims=(0, *dims), student_widths=(0.5,), student_epochs=1, qat_epochs=(0, 1),
        linear_precision=("none", "int8_weight_only")))
