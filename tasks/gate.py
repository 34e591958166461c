"""The gate: which candidates pass the budget, which one is chosen, whether it is promoted."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tasks.types import (
    Budget,
    CandidateResult,
    GateDecision,
    Metrics,
    Resolution,
    TrivialBaseline,
    budget_target,
)


@dataclass(frozen=True)
class Champion:
    """The model the `production` alias points at, evaluated on this run's test split; or,
    with `problem` set, why it could not be (then nothing is promoted over it)."""

    version: int
    metrics: Metrics | None = None
    loss: float | None = None  # baseline - champion on the main metric, same rows (point)
    problem: str | None = None


@dataclass(frozen=True)
class Verdict:
    decisions: tuple[GateDecision, ...]
    chosen: str | None  # best passing candidate by the objective
    promote: bool
    reason: str


def _objective(c: CandidateResult, budget: Budget) -> float:
    return _objective_of_metrics(c.metrics, budget)


def check(c: CandidateResult, baseline: Metrics, budget: Budget) -> GateDecision:
    """Every failed budget or constraint of one candidate, each with its margin."""
    reasons: list[str] = []
    deltas = {d.metric: d for d in c.deltas}
    for name, rule in budget.metrics.items():
        metric = budget_metric(name, c.metrics)
        if metric not in deltas:
            reasons.append(f"{metric}: not measured for this candidate")
            continue
        d = deltas[metric]
        loss_high = d.loss_ci_high / d.baseline if rule.relative else d.loss_ci_high
        unit = " (relative)" if rule.relative else ""
        if math.isnan(loss_high):  # a degenerate interval proves nothing: never a pass
            reasons.append(f"{metric}: loss upper bound is undefined (NaN)")
        elif loss_high > rule.max_drop:
            reasons.append(f"{metric}: loss upper bound {loss_high:.5f}{unit} > budget "
                           f"{rule.max_drop:.5f} (over by {loss_high - rule.max_drop:.5f})")
    m = c.metrics
    if budget.max_size_bytes is not None and m.size_bytes > budget.max_size_bytes:
        reasons.append(f"size: {m.size_bytes} bytes > max {budget.max_size_bytes}")
    if budget.min_size_ratio is not None:
        ratio = baseline.size_bytes / m.size_bytes
        if ratio < budget.min_size_ratio:
            reasons.append(f"size_ratio: {ratio:.2f}x < min {budget.min_size_ratio:.2f}x")
    if budget.max_p99_ms is not None:
        p99 = m.p99_ms(budget.latency_batch_size)
        if p99 is None or p99 > budget.max_p99_ms:
            reasons.append(f"p99@{budget.latency_batch_size}: {p99} ms > max {budget.max_p99_ms} ms")
    if budget.min_latency_ratio is not None:
        bs = budget.latency_batch_size
        ratio = next((r for r in c.latency_ratio if r.batch_size == bs), None)
        if ratio is None:
            reasons.append(f"latency_ratio@{bs}: not measured for this candidate")
        elif not ratio.ci_low >= budget.min_latency_ratio:  # NaN never passes
            reasons.append(f"latency_ratio@{bs}: lower bound {ratio.ci_low:.2f}x (ratio "
                           f"{ratio.value:.2f}x) < min {budget.min_latency_ratio:.2f}x")
    return GateDecision(candidate_id=c.candidate.id, passed=not reasons, reasons=tuple(reasons))


def budget_metric(name: str, metrics: Metrics) -> str:
    """The measured metric a budget key names (`tasks.types.budget_target`)."""
    return budget_target(name, metrics.main)


def _main_loss(c: CandidateResult) -> float:
    return -next(d.delta for d in c.deltas if d.metric == c.metrics.main)


def decide(baseline: Metrics, champion: Champion | None, candidates: list[CandidateResult],
           budget: Budget) -> Verdict:
    """Judge every candidate, pick one by the objective, and decide on promotion.

    Rule: a candidate passes when, for each budgeted metric, the upper `confidence` bound of
    its loss against the baseline (paired, same test rows) is within the budget, and every
    size/latency constraint holds. Among the passing, the objective picks one. It is promoted
    only if there is no production champion, or it beats the champion on the objective
    without a larger loss of the main metric (AUC for a ranker). A champion that could not
    be verified or measured on these rows (`Champion.problem`) blocks promotion.

    Worked example (budget: AUC may drop 0.1% relative, objective smallest; baseline AUC
    0.8000, 40 MB):
        A: 11 MB, AUC loss upper bound 0.0004 -> 0.0004/0.8 = 0.05% <= 0.1%   -> passes
        B:  6 MB, AUC loss upper bound 0.0012 -> 0.0012/0.8 = 0.15%  > 0.1%   -> fails
           ("auc: loss upper bound 0.00150 (relative) > budget 0.00100 (over by 0.00050)")
        chosen: A (the smallest passing). Champion v3 is 11 MB with loss 0.0002: A is not
        smaller -> not promoted ("does not beat production v3 on smallest").
    """
    decisions = tuple(check(c, baseline, budget) for c in candidates)
    passing = [c for c, d in zip(candidates, decisions) if d.passed]
    if not passing:
        return Verdict(decisions, None, False, "no candidate passed the budget")
    best = min(passing, key=lambda c: (_objective(c, budget), c.candidate.id))
    if champion is None:
        return Verdict(decisions, best.candidate.id, True, "no production model yet")
    if champion.problem is not None or champion.metrics is None or champion.loss is None:
        return Verdict(decisions, best.candidate.id, False,
                       champion.problem or f"production v{champion.version} was not measured")
    loss = _main_loss(best)
    champion_score = _objective_of_metrics(champion.metrics, budget)
    if _objective(best, budget) >= champion_score:
        return Verdict(decisions, best.candidate.id, False,
                       f"does not beat production v{champion.version} on {budget.objective} "
                       f"({_objective(best, budget):.6g} vs {champion_score:.6g})")
    if loss > champion.loss:
        return Verdict(decisions, best.candidate.id, False,
                       f"larger {best.metrics.main} loss than production v{champion.version} "
                       f"({loss:.5f} > {champion.loss:.5f})")
    return Verdict(decisions, best.candidate.id, True,
                   f"beats production v{champion.version} on {budget.objective}")


def _objective_of_metrics(m: Metrics, budget: Budget) -> float:
    """Lower is better."""
    if budget.objective == "smallest":
        return float(m.size_bytes)
    if budget.objective == "fastest":
        return m.p99_ms(budget.latency_batch_size) or float("inf")
    return -m.value()


def resolution_warnings(resolution: tuple[Resolution, ...], confidence: float) -> tuple[str, ...]:
    """One line per budget the test split cannot resolve, with the rows it would need."""
    out = []
    for r in resolution:
        if r.resolvable:
            continue
        rows = (f"about {r.rows_needed:,} test rows would be needed (now {r.rows:,})"
                if r.rows_needed else f"more test rows would be needed (now {r.rows:,})")
        out.append(f"budget {r.metric}: the test split resolves a {r.measured} loss of "
                   f"{r.resolution:.5f} ({r.relative_resolution:.3%} of the baseline) at "
                   f"confidence {confidence:g}, more than the budget allows ({r.budget:.5f}); "
                   f"a candidate can hardly be shown inside it: {rows}, or loosen the budget")
    return tuple(out)


def preflight(trivial: tuple[TrivialBaseline, ...], resolution: tuple[Resolution, ...],
              budget: Budget, require_useful_baseline: bool, baseline: Metrics) -> str | None:
    """Why the run must stop before compressing anything, or None.

    A baseline is worth compressing when it beats every trivial predictor of its family on
    the main metric: the one-sided lower bound of (baseline - trivial), paired on the same
    test rows, is above zero. Example: a ranker with test AUC 0.5212 [0.4801, 0.5623] against
    the item-CTR prior's 0.5150 has a margin of +0.0062 with lower bound -0.0310: not shown to
    be better -> stop (unless `require_useful_baseline` is false). With
    `budget.strict_resolution`, a budget below the split's resolution stops the run too.
    """
    if require_useful_baseline:
        for t in sorted(trivial, key=lambda t: -t.value):
            if not t.margin_low > 0:  # NaN is not a margin
                q = baseline.quality[baseline.main]
                return (f"the baseline is not worth compressing: its {t.metric} "
                        f"{q.value:.4f} [{q.ci_low:.4f}, {q.ci_high:.4f}] does not beat the "
                        f"trivial {t.name} predictor ({t.value:.4f}) on these {baseline.rows:,} "
                        f"test rows (margin {t.margin:+.4f}, lower bound {t.margin_low:+.4f}); "
                        "give it more data or more epochs (train.epochs, train.patience), or "
                        "check that the label depends on the features - or set "
                        "require_useful_baseline=false to compress it anyway")
    if budget.strict_resolution:
        lines = resolution_warnings(resolution, budget.confidence)
        if lines:
            return "budget.strict_resolution: " + " | ".join(lines)
    return None
