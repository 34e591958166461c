"""The recipe search (tasks.recipe): its space, its front, and a whole search on tiny in
process - shared prefixes built once, trials scored on valid only, the front judged on test."""

import logging

import optuna
import pytest
from pydantic import ValidationError

from tasks.execute import LocalExecutor, run_plan, searches
from tasks.generator import generate
from tasks.models import resolve
from tasks.plan import plan
from tasks.recipe import large_tables, pareto_front, run_search, student_spec, suggest
from tasks.types import (
    Budget,
    Candidate,
    CompressionRequest,
    DatasetRequest,
    DistillConfig,
    DlrmSpec,
    MetricBudget,
    QuantizeConfig,
    RecipeSearch,
    Resources,
    SasrecSpec,
    SearchSpace,
    TrainConfig,
    TrialRecord,
    TwoTowerSpec,
    Validated,
)


def test_students_are_smaller_members_of_the_same_family():
    for spec in (DlrmSpec(), TwoTowerSpec(), SasrecSpec()):
        s = student_spec(spec, 16, 0.5)
        assert type(s) is type(spec) and s.embedding_dim == 16
    assert student_spec(DlrmSpec(), 16, 0.5).bottom_mlp[-1] == 16  # DLRM: bottom ends at dim
    assert student_spec(DlrmSpec(), 0, 0.5) is None  # 0 = no student
    assert student_spec(DlrmSpec(embedding_dim=16), 16, 1.0) is None  # not smaller
    assert student_spec(SasrecSpec(heads=2), 9, 1.0).heads == 1  # heads divide the width


def test_large_tables_are_the_module_paths_of_big_tables():
    _, data = generate("tiny", 0)
    spec = resolve(DlrmSpec(), data)
    big = large_tables(spec, 1000)
    assert big and all(p.startswith("embeddings.") for p in big)
    assert len(large_tables(spec, 1)) == len(spec.tables)


def test_suggest_builds_a_valid_chain_from_fixed_choices():
    _, data = generate("tiny", 0)
    spec = resolve(DlrmSpec(), data)
    tables = large_tables(spec, 1000)
    params = {"student_dim": 16, "student_width": 0.5, "temperature": 2.0, "prune": 0.5, "tt_rank": 0,
              "tables": "rowwise_int8", "linear": "int8_weight_only", "qat": 1,
              **{f"table:{p}": "rowwise_int4" for p in tables}}
    cand, before_last = suggest(optuna.trial.FixedTrial(params), SearchSpace(prune=(0.0, 0.5)),
                                spec, tables)
    kinds = [s.kind for s in cand.plan]
    assert kinds == ["distill", "prune", "quantize"] and before_last == 2
    quant = cand.plan[-1]
    assert quant.finetune_epochs == 1 and set(quant.layers.values()) == {"rowwise_int4"}
    assert Candidate.model_validate_json(cand.model_dump_json()) == cand
    # a tiered table dtype brings its head share
    tiered = {**params, "student_dim": 0, "prune": 0.0, "head_share": 0.4,
              **{f"table:{p}": "tiered_int4_int2" for p in tables}}
    cand, _ = suggest(optuna.trial.FixedTrial(tiered), SearchSpace(
        table_precision=("rowwise_int4", "tiered_int4_int2"), head_shares=(0.3, 0.4)), spec, tables)
    assert cand.plan[-1].head_share == 0.4 and "@head0.4" in cand.label()


def test_search_config_refuses_bad_spaces_by_name():
    with pytest.raises(ValidationError, match="student_widths"):
        SearchSpace(student_widths=(1.5,))
    with pytest.raises(ValidationError, match="at least one value"):
        SearchSpace(qat_epochs=())
    with pytest.raises(ValidationError, match="each at most once"):
        RecipeSearch(objectives=("size", "size"))
    with pytest.raises(ValidationError, match="table_precision"):
        SearchSpace(table_precision=("rowwise_int3",))


def _record(n, size, p99, loss, feasible=True):
    v = Validated(rows=100, main="auc", value=0.7, baseline_value=0.7, relative_loss=loss,
                  size_bytes=size, baseline_bytes=1000, p99_ratio=p99)
    return TrialRecord(number=n, plan=f"p{n}", validated=v, feasible=feasible)


def test_front_keeps_only_feasible_undominated_trials_best_first():
    trials = [_record(0, 100, 1.0, 0.0), _record(1, 50, 2.0, 0.0005), _record(2, 60, 1.5, 0.0006),
              _record(3, 10, 3.0, 0.0, feasible=False), _record(4, 200, 3.0, 0.0)]
    front = pareto_front(trials, RecipeSearch(front=4), "smallest")
    assert [t.number for t in front] == [1, 0, 4]  # 2 is dominated by 1; 3 is infeasible
    assert [t.number for t in pareto_front(trials, RecipeSearch(front=4), "fastest")][0] == 4
    assert len(pareto_front(trials, RecipeSearch(front=1), "smallest")) == 1


class CountingExecutor(LocalExecutor):
    """Counts how often each node's task function ran."""

    def __init__(self):
        super().__init__(log=logging.getLogger("test"))
        self.ran: list[str] = []

    def run(self, graph, keys):
        before = set(self.outputs)
        out = super().run(graph, keys)
        self.ran += [k for k in self.outputs if k not in before]
        return out


@pytest.mark.slow
def test_a_search_on_tiny_shares_prefixes_scores_on_valid_and_sends_its_front_to_the_gate():
    request = CompressionRequest(
        model_name="t", dataset=DatasetRequest(builtin="tiny"),
        train=TrainConfig(epochs=2, batch_size=512),
        candidates=(Candidate(id="int8", plan=(QuantizeConfig(),)),),
        search=RecipeSearch(trials=4, parallelism=2, latency_seconds=0.5, prune_at=1000,
                            space=SearchSpace(student_dims=(8,), student_widths=(0.5,),
                                              student_temperatures=(1.0,),
                                              per_table=False, qat_epochs=(0,),
                                              linear_precision=("none", "int8_weight_only"))),
        budget=Budget(metrics={"main": MetricBudget(max_drop=0.5, relative=True)}),
        resources=Resources(timing_seconds=2), promote=False, require_useful_baseline=False)
    executor = CountingExecutor()
    graph = plan(request)
    executed = run_plan(graph, executor, searches(request, None, _recipe))
    report = executed.search
    assert report is not None and len(report.trials) == 4 and report.wall_s > 0
    # a chain proposed twice (in one batch, too) is one trial of the budget
    assert len({t.plan for t in report.trials}) == 4
    ops = [graph.nodes[k] for k in executor.ran]
    students = [n for n in ops if n.op == "stage" and n.label.startswith("distill")]
    assert len(students) == 1  # every trial starts from the one student, built once
    assert len(executor.ran) == len(set(executor.ran))  # no node ran twice
    # trials are scored on valid; only the front's candidates are evaluated on test
    evaluated = {n.value.id for n in ops if n.op == "evaluate"}
    assert evaluated == {"int8", *report.front} and report.front
    assert any(n.op == "validate" for n in ops)
    front = [r for r in executed.results if r.candidate.id in report.front]
    assert front and all(r.latency_ratio for r in front)  # timed with every candidate
    assert front[0].candidate.plan[0] == DistillConfig(
        student=student_spec(resolve(DlrmSpec(), executed.dataset.spec), 8, 0.5), epochs=2)
    assert report.cpu_s > 0


def _recipe(graph, executor, executed):
    executed.search = run_search(graph, executor, executed)


def test_warm_start_choices_stay_inside_the_space():
    import pyarrow as pa

    from tasks.recipe import warm_start

    class Store:
        def get_blob(self, ref):
            sink = pa.BufferOutputStream()
            pa.parquet.write_table(pa.Table.from_pylist([
                {"module": "embeddings.0", "choice": c, "bytes": b, "relative_loss": loss}
                for c, b, loss in (("none", 400, 0.0), ("rowwise_int8", 120, 0.0001),
                                   ("rowwise_int4", 60, 0.0003), ("rowwise_int2", 30, 0.01))]),
                sink)
            return sink.getvalue().to_pybytes()

    class Ex:
        store = Store()

        def run(self, graph, keys):
            return {keys[0]: type("Refs", (), {"sensitivity": None})()}

    class G:
        calibration = "cal"

    import pyarrow.parquet  # noqa: F401 (pa.parquet)

    space = SearchSpace(student_dims=(8, 16), student_widths=(0.25, 0.5), qat_epochs=(1,))
    params = warm_start(G(), Ex(), space, ["embeddings.0"], allowed=0.001, margin=0.5)
    assert params["student_dim"] == 8 and params["student_width"] == 0.5 and params["qat"] == 1
    assert params["table:embeddings.0"] == "rowwise_int4"  # cheapest within 0.0005


def test_a_request_that_lists_nothing_gets_a_search_and_a_list_gets_exactly_that():
    from tasks.defaults import default_candidates, default_search

    assert CompressionRequest().search == default_search("dlrm")
    assert CompressionRequest(model=SasrecSpec()).search == default_search("sasrec")
    listed = CompressionRequest(candidates=default_candidates()[:1])
    assert listed.search is None and len(listed.candidates) == 1
    assert CompressionRequest(search=None).search is None
    assert CompressionRequest(search=None).candidates == default_candidates()
    # the JSON a UI or REST caller sends round-trips with its search
    again = CompressionRequest.model_validate_json(CompressionRequest().model_dump_json())
    assert again.search == default_search("dlrm")


def test_a_search_whose_space_runs_out_of_chains_ends_and_reports_it_done():
    """One chain in the space, 3 trials asked: the sampler keeps proposing that chain, the
    search stops after its proposal limit with one trial, and its progress ends at 100 (the
    UI's bar of a finished search is full, whichever limit ended it)."""
    request = CompressionRequest(
        model_name="t", dataset=DatasetRequest(builtin="tiny"),
        train=TrainConfig(epochs=1, batch_size=512),
        candidates=(Candidate(id="int8", plan=(QuantizeConfig(),)),),
        search=RecipeSearch(trials=3, parallelism=1, latency_seconds=0.5, prune_at=1000,
                            warm_start=False,
                            space=SearchSpace(student_dims=(0,), student_widths=(1.0,),
                                              student_temperatures=(1.0,), per_table=False,
                                              qat_epochs=(0,), table_precision=("rowwise_int8",),
                                              linear_precision=("none",))),
        budget=Budget(metrics={"main": MetricBudget(max_drop=0.5, relative=True)}),
        resources=Resources(timing_seconds=2), promote=False, require_useful_baseline=False)
    seen: list[float] = []

    def recipe(graph, executor, executed):
        executed.search = run_search(graph, executor, executed, seen.append)

    executed = run_plan(plan(request), CountingExecutor(), searches(request, None, recipe))
    assert executed.search is not None and len(executed.search.trials) == 1
    assert seen == sorted(seen) and seen[-1] == 100.0 and seen[0] < 100.0
