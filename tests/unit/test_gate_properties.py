"""Property: whatever the budget, the candidates and the champion, nothing over a budget or a
constraint is ever chosen or promoted (hypothesis explores the space, shrinks any failure)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.gate import Champion, decide
from tasks.types import Budget, MetricBudget
from tests.unit.test_gate import BASE_AUC, metrics, result

rules = st.builds(MetricBudget, max_drop=st.floats(0, 0.01), relative=st.booleans())
budgets = st.builds(
    Budget,
    metrics=st.dictionaries(st.sampled_from(["main", "auc", "logloss"]), rules, max_size=3),
    max_size_bytes=st.none() | st.integers(1, 100),
    min_size_ratio=st.none() | st.floats(1.0, 20.0),
    max_p99_ms=st.none() | st.floats(0.5, 5.0),
    objective=st.sampled_from(["smallest", "fastest", "best_quality"]),
)
candidates = st.lists(
    st.tuples(st.integers(1, 100), st.floats(-0.005, 0.01), st.floats(-0.01, 0.02),
              st.none() | st.floats(0.1, 10.0), st.floats(-0.01, 0.02)),
    min_size=1, max_size=6)
champions = st.none() | st.builds(
    lambda size, loss: Champion(version=1, metrics=metrics(size, BASE_AUC - loss), loss=loss),
    st.integers(1, 100), st.floats(-0.005, 0.01))


def within(c, budget: Budget) -> bool:
    """The budget, re-stated independently of tasks.gate."""
    for metric, rule in budget.metrics.items():
        name = "auc" if metric == "main" else metric  # the ranker's main metric
        d = next(x for x in c.deltas if x.metric == name)
        bound = d.loss_ci_high / d.baseline if rule.relative else d.loss_ci_high
        if not bound <= rule.max_drop:
            return False
    size, p99 = c.metrics.size_bytes, c.metrics.p99_ms(budget.latency_batch_size)
    if budget.max_size_bytes is not None and size > budget.max_size_bytes:
        return False
    if budget.min_size_ratio is not None and 40 / size < budget.min_size_ratio:
        return False
    return budget.max_p99_ms is None or (p99 is not None and p99 <= budget.max_p99_ms)


@settings(max_examples=400, deadline=None)
@given(budget=budgets, specs=candidates, champion=champions)
def test_no_candidate_over_any_budget_is_ever_chosen_or_promoted(budget, specs, champion):
    cands = [result(f"c{i}", size, loss, max(high, loss), p99, ll)
             for i, (size, loss, high, p99, ll) in enumerate(specs)]
    verdict = decide(metrics(40), champion, cands, budget)
    by_id = {c.candidate.id: c for c in cands}
    for d in verdict.decisions:
        assert d.passed == within(by_id[d.candidate_id], budget)
        assert d.passed == (not d.reasons)
    if verdict.chosen is not None:
        assert within(by_id[verdict.chosen], budget)
    if verdict.promote:
        assert verdict.chosen is not None and within(by_id[verdict.chosen], budget)
    else:
        assert verdict.reason  # "not promoted" always says why
