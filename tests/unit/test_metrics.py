import numpy as np
import pytest

from tasks.metrics import auc, auc_with_ci, logloss, paired_auc_loss


def brute_auc(y, p):
    pos, neg = p[y == 1], p[y == 0]
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return gt / (len(pos) * len(neg))


def test_auc_matches_brute_force_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 3000)
    p = np.round(0.3 * y + rng.random(3000), 2)  # many ties
    assert auc(y, p) == pytest.approx(brute_auc(y, p), abs=1e-12)


def test_auc_ci_contains_value_and_shrinks_with_n():
    rng = np.random.default_rng(2)
    widths = []
    for n in (2000, 20000):
        y = rng.integers(0, 2, n)
        p = 0.5 * y + rng.random(n)
        value, lo, hi = auc_with_ci(y, p)
        assert lo < value < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2.5  # ~ 1/sqrt(10)


def test_paired_loss_of_identical_scores_is_zero():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 5000)
    p = 0.4 * y + rng.random(5000)
    base, delta, upper = paired_auc_loss(y, p, p)
    assert delta == 0.0 and upper == pytest.approx(0.0, abs=1e-12)


def test_paired_ci_detects_a_real_loss():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 20000)
    good = 0.6 * y + rng.random(20000)
    worse = good + rng.normal(0, 0.3, 20000)
    _, delta, upper = paired_auc_loss(y, good, worse)
    assert delta < 0 and upper > -delta > 0


def test_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        auc(np.ones(10), np.random.default_rng(0).random(10))


def test_logloss_known_value():
    assert logloss(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))
