"""Before any compression: is the baseline worth compressing, and can the test split resolve
the budget? (DESIGN §8 (b), (c).) Pure numpy on predictions; the flow calls it once per run.

Trivial predictors need no model. For a ranker: the global click rate of the train split (a
constant: AUC 0.5) and each item's smoothed click rate on the train split; for retrieval and
next-item: the catalogue ranked by train-split clicks (popularity). A baseline beats one when
the one-sided lower `confidence` bound of (baseline - trivial) on the main metric, paired on the
same test rows (DeLong for AUC, the paired bootstrap otherwise), is above zero.

Resolution: the smallest loss the gate can tell from zero on this split. It is measured with the
gate's own bound on a reference candidate that loses nothing on average but moves each row's
score a little - the baseline's logit (ranking) or log-rank of the clicked item (retrieval,
next-item) plus independent noise of `RESOLUTION_NOISE` times that score's standard deviation,
about what a compressed model does. resolution = upper bound - point loss of that candidate;
it shrinks as 1/sqrt(rows), so a budget b needs about rows * (resolution / b)^2 test rows.
"""

from __future__ import annotations

import math

import numpy as np

from tasks.data import Arrays
from tasks.metrics import paired_auc_loss, paired_bootstrap_upper
from tasks.quality import paired_deltas, rank_metrics, scalar_quality
from tasks.types import Budget, Resolution, TrivialBaseline, budget_target

PRIOR_ROWS = 20.0  # an item's click rate is shrunk to the global rate as if seen this often
RESOLUTION_NOISE = 0.1


def trivial_predictions(task: str, train: Arrays, test: Arrays, item_column: int | None,
                        n_items: int) -> dict[str, np.ndarray]:
    """Each trivial predictor's output on `test`, in the form `objectives.predict` gives
    (ranking: click probabilities; retrieval / next_item: the clicked item's rank)."""
    if task == "ranking":
        ctr = float(train.label.mean())
        out = {"global_ctr": np.full(len(test), ctr)}
        if item_column is not None:
            seen = train.sparse[:, item_column]
            clicks = np.bincount(seen, weights=train.label, minlength=n_items)
            shown = np.bincount(seen, minlength=n_items)
            prior = (clicks + PRIOR_ROWS * ctr) / (shown + PRIOR_ROWS)
            out["item_ctr"] = prior[np.clip(test.sparse[:, item_column], 0, len(prior) - 1)]
        return out
    counts = np.sort(np.bincount(train.label.astype(np.int64), minlength=n_items))
    own = np.bincount(train.label.astype(np.int64), minlength=n_items)[test.label]
    # rank = items scored at least as high as the clicked one, minus itself (ties count
    # against it, as `objectives.predict` counts them)
    ranks = n_items - np.searchsorted(counts, own, side="left") - 1
    return {"popularity": ranks.astype(np.int64)}


def _main_loss(task: str, metric: str, test: Arrays, base: np.ndarray, cand: np.ndarray,
               confidence: float) -> tuple[float, float]:
    """(candidate - baseline, upper `confidence` bound of baseline - candidate) on `metric`,
    the main metric (no segment)."""
    if task == "ranking":
        _, delta, high = paired_auc_loss(test.label, base, cand, confidence)
        return delta, high
    k = int(metric.split("@")[1])
    b, c = rank_metrics(task, base, (k,))[metric], rank_metrics(task, cand, (k,))[metric]
    return float(c.mean() - b.mean()), paired_bootstrap_upper(b - c, confidence)


def compare_trivial(task: str, metric: str, test: Arrays, trivial: dict[str, np.ndarray],
                    baseline: np.ndarray, confidence: float) -> tuple[TrivialBaseline, ...]:
    """The baseline against each trivial predictor on the main metric, paired."""
    out = []
    for name, pred in trivial.items():
        delta, loss_high = _main_loss(task, metric, test, pred, baseline, confidence)
        out.append(TrivialBaseline(name=name, metric=metric,
                                   value=scalar_quality(task, test, pred),
                                   margin=delta, margin_low=-loss_high))
    return tuple(out)


def perturbed(task: str, pred: np.ndarray, noise: float | None = None,
              seed: int = 0) -> np.ndarray:
    """The reference candidate of `resolution`: each row's score moved by independent noise."""
    noise = RESOLUTION_NOISE if noise is None else noise
    z = np.random.default_rng(seed).standard_normal(len(pred))
    if task == "ranking":
        p = np.clip(pred, 1e-7, 1 - 1e-7)
        logit = np.log(p / (1 - p))
        return 1 / (1 + np.exp(-(logit + noise * logit.std() * z)))
    log_rank = np.log1p(pred.astype(np.float64))
    moved = np.expm1(log_rank + noise * log_rank.std() * z)
    return np.maximum(np.rint(moved), 0).astype(np.int64)


def resolution(task: str, test: Arrays, baseline: np.ndarray, budget: Budget, main: str,
               ks: tuple[int, ...]) -> tuple[Resolution, ...]:
    """For each budgeted metric: the smallest loss this split resolves at the budget's
    confidence, the budget as an absolute loss, and the test rows the budget would need."""
    reference = perturbed(task, baseline)
    deltas = {d.metric: d for d in paired_deltas(task, test, baseline, reference, ks,
                                                 budget.confidence)}
    out = []
    for name, rule in budget.metrics.items():
        metric = budget_target(name, main)
        d = deltas.get(metric)
        if d is None:
            width, base_value = math.nan, math.nan
        else:
            # width of the one-sided bound; a logloss loss is a rise, the others a drop
            width = d.loss_ci_high - (d.delta if metric == "logloss" else -d.delta)
            base_value = d.baseline
        allowed = rule.max_drop * abs(base_value) if rule.relative else rule.max_drop
        ok = math.isfinite(width) and width <= allowed
        needed = None
        if math.isfinite(width) and not ok:
            needed = len(test) * (width / allowed) ** 2 if allowed > 0 else math.inf
        out.append(Resolution(
            metric=name, measured=metric, budget=allowed, resolution=width,
            relative_resolution=width / abs(base_value) if base_value else math.nan,
            rows=len(test), resolvable=ok,
            rows_needed=None if needed is None or not math.isfinite(needed)
            else int(math.ceil(needed))))
    return tuple(out)
