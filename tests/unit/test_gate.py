import pytest

from tasks.gate import Champion, check, decide
from tasks.types import (
    ArtifactRef,
    Budget,
    Candidate,
    CandidateResult,
    Estimate,
    Latency,
    MetricBudget,
    Metrics,
    PairedDelta,
    QuantizeConfig,
)

BASE_AUC = 0.8


def metrics(size: int, auc: float = BASE_AUC, p99: float | None = 2.0) -> Metrics:
    return Metrics(quality={"auc": Estimate(value=auc, ci_low=auc - 0.01, ci_high=auc + 0.01)},
                   logloss=0.4,
                   rows=1000, size_bytes=size, params=10,
                   latency=(Latency(batch_size=512, p50_ms=p99 / 2, p99_ms=p99),) if p99 else ())


def result(cid: str, size: int, loss: float, loss_high: float, p99: float | None = 2.0,
           ll_high: float = 0.0) -> CandidateResult:
    return CandidateResult(
        candidate=Candidate(id=cid, plan=(QuantizeConfig(),)),
        model=ArtifactRef(uri="s3://b/objects/x", sha256="0" * 64, size_bytes=size, kind="model"),
        metrics=metrics(size, BASE_AUC - loss, p99),
        deltas=(PairedDelta(metric="auc", delta=-loss, loss_ci_high=loss_high, baseline=BASE_AUC),
                PairedDelta(metric="logloss", delta=0.0, loss_ci_high=ll_high, baseline=0.4)),
        node_ip="127.0.0.3", wall_s=1.0,
    )


REL = Budget(metrics={"auc": MetricBudget(max_drop=0.001, relative=True)})
ABS = Budget(metrics={"auc": MetricBudget(max_drop=0.001)})


@pytest.mark.parametrize("budget, loss_high, passes", [
    (REL, 0.0004, True),           # 0.05% relative
    (REL, 0.0008, True),           # exactly 0.1% relative (0.0008/0.8) is within budget
    (REL, 0.0012, False),          # 0.15% relative
    (ABS, 0.0009, True),
    (ABS, 0.0011, False),
    (REL, -0.0001, True),          # a certain gain
])
def test_budget_is_judged_on_the_upper_bound(budget, loss_high, passes):
    verdict = decide(metrics(40), None, [result("a", 10, 0.0, loss_high)], budget)
    assert verdict.decisions[0].passed is passes
    if not passes:
        assert "auc: loss upper bound" in verdict.decisions[0].reasons[0]
        assert "over by" in verdict.decisions[0].reasons[0]


def test_docstring_worked_example():
    a, b = result("a", 11, 0.0001, 0.0004), result("b", 6, 0.0005, 0.0012)
    verdict = decide(metrics(40), None, [a, b], REL)
    assert [d.passed for d in verdict.decisions] == [True, False]
    assert "(over by 0.00050)" in verdict.decisions[1].reasons[0]
    assert verdict.chosen == "a" and verdict.promote
    champion = Champion(version=3, metrics=metrics(11, BASE_AUC - 0.0002), loss=0.0002)
    verdict = decide(metrics(40), champion, [a, b], REL)
    assert not verdict.promote and "does not beat production v3" in verdict.reason


def test_constraints_report_their_margin():
    budget = Budget(metrics={}, max_size_bytes=5, min_size_ratio=10, max_p99_ms=1.0)
    d = decide(metrics(40), None, [result("a", 8, 0, 0, p99=3.0)], budget).decisions[0]
    assert not d.passed and len(d.reasons) == 3
    assert "size: 8 bytes > max 5" in d.reasons[0]
    assert "size_ratio: 5.00x < min 10.00x" in d.reasons[1]


@pytest.mark.parametrize("objective, chosen", [
    ("smallest", "small"), ("fastest", "fast"), ("best_quality", "good"),
])
def test_objective_picks_among_passing(objective, chosen):
    cands = [result("small", 5, 0.0004, 0.0006, p99=3), result("fast", 9, 0.0003, 0.0006, p99=1),
             result("good", 20, 0.0, 0.0002, p99=2), result("bad", 1, 0.01, 0.02, p99=0.5)]
    budget = Budget(objective=objective)
    assert decide(metrics(40), None, cands, budget).chosen == chosen


def test_champion_with_smaller_loss_blocks_equal_size_candidate_and_better_one_wins():
    champion = Champion(version=1, metrics=metrics(10, BASE_AUC - 0.0001), loss=0.0001)
    same = decide(metrics(40), champion, [result("a", 10, 0.0001, 0.0003)], REL)
    assert not same.promote
    smaller_but_lossier = decide(metrics(40), champion, [result("a", 8, 0.0003, 0.0005)], REL)
    assert not smaller_but_lossier.promote and "larger auc loss" in smaller_but_lossier.reason
    better = decide(metrics(40), champion, [result("a", 8, 0.0001, 0.0003)], REL)
    assert better.promote


def test_nothing_passes_is_not_an_error():
    verdict = decide(metrics(40), None, [result("a", 10, 0.01, 0.02)], REL)
    assert verdict.chosen is None and not verdict.promote
    assert verdict.reason == "no candidate passed the budget"


LL_REL = Budget(metrics={"logloss": MetricBudget(max_drop=0.01, relative=True)})
BOTH = Budget(metrics={"auc": MetricBudget(max_drop=0.001, relative=True),
                       "logloss": MetricBudget(max_drop=0.002)})


@pytest.mark.parametrize("budget, auc_high, ll_high, failed", [
    (LL_REL, 0.5, 0.0039, []),                  # logloss alone: 0.0039/0.4 < 1% (auc unbudgeted)
    (LL_REL, 0.0, 0.0041, ["logloss"]),         # 1.025% relative rise
    (BOTH, 0.0008, 0.002, []),                  # both exactly at their budgets
    (BOTH, 0.0009, 0.002, ["auc"]),
    (BOTH, 0.0009, 0.0021, ["auc", "logloss"]),  # every failed budget is listed
    (BOTH, float("nan"), 0.0, ["auc"]),         # an undefined bound never passes
    (BOTH, -0.002, -0.01, []),                  # certain gains
])
def test_every_budgeted_metric_is_judged_and_reported(budget, auc_high, ll_high, failed):
    d = decide(metrics(40), None, [result("a", 10, 0.0, auc_high, ll_high=ll_high)],
               budget).decisions[0]
    assert d.passed is (not failed)
    assert [r.split(":")[0] for r in d.reasons] == failed


def test_latency_constraint_without_a_measurement_fails():
    budget = Budget(max_p99_ms=5.0)
    d = decide(metrics(40), None, [result("a", 10, 0.0, 0.0, p99=None)], budget).decisions[0]
    assert not d.passed and "p99@512: None ms > max 5.0 ms" in d.reasons[0]


def test_pareto_front_and_plot():
    from tasks.report import pareto_front, pareto_png
    from tasks.types import LeaderboardRow

    def row(cid, size, auc, passed=True):
        return LeaderboardRow(candidate=cid, plan="p", size_bytes=size, size_ratio=40 / size,
                              metric="auc", quality=auc, delta=auc - 0.8, loss_ci_high=0.0,
                              logloss_delta=0.0, p99_ms_bs512=1.0, latency_ratio=1.0,
                              passed=passed, reasons=(), node_ip="127.0.0.3")

    rows = (row("a", 10, 0.80), row("b", 5, 0.79), row("c", 12, 0.78, False), row("d", 5, 0.795))
    assert {r.candidate for r in pareto_front(rows)} == {"a", "d"}  # c and b are dominated

    class Report:
        leaderboard, model_name, run_id = rows, "m", "0123456789"

    png = pareto_png(Report())  # type: ignore[arg-type]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_a_latency_constraint_is_judged_on_the_low_end_of_the_ratio_interval():
    from tasks.types import LatencyRatio

    budget = Budget(metrics={"auc": MetricBudget(max_drop=0.01)}, min_latency_ratio=1.5)
    timed = result("fast", 10, 0.0, 0.0001).model_copy(update={"latency_ratio": (
        LatencyRatio(batch_size=512, value=1.8, ci_low=1.4, ci_high=2.2, rounds=30),)})
    [reason] = check(timed, metrics(100), budget).reasons
    assert reason == "latency_ratio@512: lower bound 1.40x (ratio 1.80x) < min 1.50x"
    surely = timed.model_copy(update={"latency_ratio": (
        LatencyRatio(batch_size=512, value=1.8, ci_low=1.6, ci_high=2.0, rounds=30),)})
    assert check(surely, metrics(100), budget).passed
    untimed = result("untimed", 10, 0.0, 0.0001)
    assert check(untimed, metrics(100), budget).reasons == (
        "latency_ratio@512: not measured for this candidate",)


def _timed(cid: str, size: int, low: float, high: float) -> CandidateResult:
    from tasks.types import LatencyRatio

    return result(cid, size, 0.0, 0.0001, p99=2.0 / ((low + high) / 2)).model_copy(update={"latency_ratio": (
        LatencyRatio(batch_size=512, value=(low + high) / 2, ci_low=low, ci_high=high,
                     rounds=30),)})


def test_small_and_fast_together_are_one_objective_plus_one_constraint():
    """'smallest subject to >= 2x faster' = objective smallest + min_latency_ratio 2; 'fastest
    subject to >= 20x smaller' = objective fastest + min_size_ratio 20 (docs/objectives.md)."""
    tiny_slow, small_fast, big_fastest = (_timed("tiny-slow", 1, 0.4, 0.6),
                                          _timed("small-fast", 4, 2.1, 2.5),
                                          _timed("big-fastest", 30, 3.0, 3.4))
    both = [tiny_slow, small_fast, big_fastest]
    smallest_fast = Budget(metrics={"auc": MetricBudget(max_drop=0.01)}, min_latency_ratio=2.0)
    assert decide(metrics(100), None, both, smallest_fast).chosen == "small-fast"
    fastest_small = Budget(metrics={"auc": MetricBudget(max_drop=0.01)}, min_size_ratio=20,
                           objective="fastest")
    assert decide(metrics(100), None, both, fastest_small).chosen == "small-fast"
    plain = Budget(metrics={"auc": MetricBudget(max_drop=0.01)})
    assert decide(metrics(100), None, both, plain).chosen == "tiny-slow"
