"""Trivial predictors, the baseline check, the budget's resolution, and a champion that
cannot be verified: the gate's checks before and around compression."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.baselines import compare_trivial, perturbed, resolution, trivial_predictions
from tasks.data import Arrays
from tasks.gate import Champion, decide, preflight, resolution_warnings
from tasks.types import Budget, MetricBudget, Resolution, TrivialBaseline
from tests.unit.test_gate import REL, metrics, result


def _rows(items: list[int], label: list[float]) -> Arrays:
    sparse = np.array([[i] for i in items], np.int64)
    return Arrays(np.zeros((len(items), 0), np.float32), sparse, np.array(label, np.float32))


def test_ranking_trivial_predictors_by_hand():
    train = _rows([0, 0, 1, 1, 1], [1, 0, 0, 0, 1])  # global CTR 0.4
    test = _rows([0, 1, 2], [1, 0, 1])
    out = trivial_predictions("ranking", train, test, item_column=0, n_items=3)
    assert out["global_ctr"].tolist() == pytest.approx([0.4] * 3)
    # smoothed per-item CTR (clicks + 20 * 0.4) / (shown + 20); unseen item 2: the global rate
    assert out["item_ctr"].tolist() == pytest.approx([9 / 22, 9 / 23, 0.4])


def test_popularity_ranks_count_ties_against_the_item():
    train = Arrays(np.zeros((6, 0), np.float32), np.zeros((6, 0), np.int64),
                   np.array([2, 2, 2, 1, 1, 0], np.int64))
    test = Arrays(np.zeros((4, 0), np.float32), np.zeros((4, 0), np.int64),
                  np.array([2, 1, 3, 0], np.int64))
    ranks = trivial_predictions("retrieval", train, test, None, n_items=4)["popularity"]
    assert ranks.tolist() == [0, 1, 3, 2]  # clicks per item [1, 2, 3, 0]


def _ranker(n: int, signal: float, seed: int = 0) -> tuple[Arrays, np.ndarray]:
    rng = np.random.default_rng(seed)
    score = rng.normal(0, 1, n)
    label = (rng.random(n) < 1 / (1 + np.exp(-(signal * score - 1.5)))).astype(np.float32)
    probs = 1 / (1 + np.exp(-(score - 1.5)))
    return _rows(list(rng.integers(0, 50, n)), list(label)), probs


def test_a_model_at_chance_does_not_beat_the_trivial_predictors_and_the_run_stops():
    test, probs = _ranker(20_000, signal=0.0)  # labels independent of the score
    trivial = {"global_ctr": np.full(len(test), 0.2)}
    [t] = compare_trivial("ranking", "auc", test, trivial, probs, 0.95)
    assert t.value == 0.5 and t.margin_low < 0
    base = metrics(100, auc=0.5 + t.margin)
    stop = preflight((t,), (), Budget(), True, base)
    assert stop is not None and stop.startswith(
        "the baseline is not worth compressing: its auc ") and "trivial global_ctr" in stop
    assert "require_useful_baseline=false" in stop
    assert preflight((t,), (), Budget(), False, base) is None


def test_a_model_with_signal_beats_them():
    test, probs = _ranker(20_000, signal=1.5)
    [t] = compare_trivial("ranking", "auc", test, {"global_ctr": np.full(len(test), 0.2)},
                          probs, 0.95)
    assert t.margin > 0.2 and t.margin_low > 0
    assert preflight((t,), (), Budget(), True, metrics(100, 0.5 + t.margin)) is None
    nan = TrivialBaseline(name="item_ctr", metric="auc", value=0.6, margin=0.1,
                          margin_low=float("nan"))
    assert preflight((nan,), (), Budget(), True, metrics(100)) is not None  # NaN is no margin


def test_resolution_shrinks_as_one_over_sqrt_rows_and_names_the_rows_needed():
    small, p_small = _ranker(10_000, 1.5, seed=1)
    large, p_large = _ranker(160_000, 1.5, seed=2)
    budget = Budget(metrics={"main": MetricBudget(max_drop=0.0001, relative=True)})
    [r_small] = resolution("ranking", small, p_small, budget, "auc", ())
    [r_large] = resolution("ranking", large, p_large, budget, "auc", ())
    assert r_small.resolution / r_large.resolution == pytest.approx(4.0, rel=0.2)
    assert not r_small.resolvable
    assert r_small.rows_needed == pytest.approx(
        10_000 * (r_small.resolution / r_small.budget) ** 2, rel=1e-6)
    [warning] = resolution_warnings((r_small,), 0.95)
    assert f"about {r_small.rows_needed:,} test rows would be needed (now 10,000)" in warning
    loose = Budget(metrics={"main": MetricBudget(max_drop=0.05, relative=True)})
    assert resolution("ranking", small, p_small, loose, "auc", ())[0].resolvable


def test_strict_resolution_refuses_what_a_warning_only_mentions():
    coarse = Resolution(metric="main", measured="auc", budget=0.0007, resolution=0.002,
                        relative_resolution=0.0028, rows=8000, resolvable=False,
                        rows_needed=65_306)
    assert preflight((), (coarse,), Budget(), True, metrics(1)) is None
    strict = Budget(strict_resolution=True)
    stop = preflight((), (coarse,), strict, True, metrics(1))
    assert stop is not None and "about 65,306 test rows would be needed (now 8,000)" in stop


def test_perturbed_ranks_stay_valid_ranks():
    ranks = np.random.default_rng(0).integers(0, 1000, 5000)
    moved = perturbed("retrieval", ranks)
    assert moved.dtype == np.int64 and moved.min() >= 0 and (moved != ranks).mean() > 0.5


def test_a_champion_that_cannot_be_verified_blocks_promotion():
    problem = ("production v3 could not be verified (sha256 mismatch in "
               "registry/m/versions/3/model.safetensors): fix or roll back the registry")
    verdict = decide(metrics(100), Champion(version=3, problem=problem),
                     [result("a", 10, 0.0, 0.0001)], REL)
    assert verdict.chosen == "a" and not verdict.promote and verdict.reason == problem

