"""How often does the gate promote a candidate whose true AUC loss is over the budget?

Synthetic candidates with a known population loss: scores are binormal (a click's score is
N(a, 1), a non-click's N(0, 1), so AUC = Phi(a / sqrt 2)); the candidate's score is the
baseline's plus independent noise N(0, s^2), which lowers its AUC to Phi(a / sqrt(2 (1 + s^2)))
while staying highly correlated with the baseline (as a compressed model is). `s` is solved
so that the true relative loss is budget * (1 + margin). Each trial draws fresh test rows, runs
the gate's own test (paired DeLong, one-sided upper bound at `confidence` <= budget) and counts
passes: for margin >= 0 every pass is a false promotion.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from tasks.metrics import paired_auc_loss

_N = NormalDist()


def _noise_for(base_auc: float, relative_loss: float) -> tuple[float, float]:
    a = math.sqrt(2) * _N.inv_cdf(base_auc)
    q = _N.inv_cdf(base_auc * (1 - relative_loss))
    return a, math.sqrt(max((a / (math.sqrt(2) * q)) ** 2 - 1, 0.0))


def pass_rate(margin: float, rows: int = 200_000, trials: int = 200, budget: float = 0.001,
              confidence: float = 0.95, base_auc: float = 0.716, ctr: float = 0.1,
              seed: int = 0) -> dict[str, float]:
    """Share of trials in which the gate passes a candidate with true relative AUC loss
    budget * (1 + margin)."""
    true_loss = budget * (1 + margin)
    a, s = _noise_for(base_auc, true_loss)
    rng = np.random.default_rng(seed)
    passes, bounds = 0, []
    for _ in range(trials):
        y = (rng.random(rows) < ctr).astype(np.float64)
        base = a * y + rng.standard_normal(rows)
        cand = base + s * rng.standard_normal(rows)
        b_auc, _, loss_high = paired_auc_loss(y, base, cand, confidence)
        bound = loss_high / b_auc
        bounds.append(bound)
        passes += bound <= budget
    return {"margin": margin, "true_relative_loss": true_loss, "rows": rows, "trials": trials,
            "confidence": confidence, "pass_rate": passes / trials,
            "mean_bound": float(np.mean(bounds)), "noise_sd": s}
