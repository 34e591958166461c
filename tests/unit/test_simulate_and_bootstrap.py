import numpy as np
import pytest

from tasks.metrics import auc, paired_bootstrap_upper
from tasks.simulate import _noise_for, pass_rate


def test_simulated_candidate_has_the_intended_true_loss():
    a, s = _noise_for(0.716, 0.002)
    rng = np.random.default_rng(1)
    y = (rng.random(2_000_000) < 0.1).astype(float)
    base = a * y + rng.standard_normal(len(y))
    cand = base + s * rng.standard_normal(len(y))
    assert auc(y, base) == pytest.approx(0.716, abs=0.002)
    assert 1 - auc(y, cand) / auc(y, base) == pytest.approx(0.002, abs=0.0004)


def test_gate_test_rejects_clear_losses_and_passes_clear_wins():
    assert pass_rate(1.0, rows=100_000, trials=10)["pass_rate"] == 0.0  # 2x the budget
    assert pass_rate(-1.0, rows=100_000, trials=10)["pass_rate"] == 1.0  # no loss at all


def test_paired_bootstrap_bound():
    assert paired_bootstrap_upper(np.full(1000, 0.25)) == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    diff = rng.normal(0.01, 1.0, 20_000)
    bound = paired_bootstrap_upper(diff, 0.95)
    normal = diff.mean() + 1.6449 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert bound == pytest.approx(normal, abs=0.003)  # ~ the normal-theory bound
    assert bound == paired_bootstrap_upper(diff, 0.95)  # seeded: reproducible
    assert paired_bootstrap_upper(diff, 0.99) > bound
