"""Mixed precision as a multiple-choice knapsack: one dtype per layer, fewest bytes, summed
sensitivity within the loss budget.

Why this algorithm: each layer's options are measured alone (the sensitivity table), and for
small per-layer perturbations the metric losses add up to first order, so "minimise total bytes
subject to summed loss <= budget" is the right model. It is solved exactly by dynamic
programming over Pareto fronts: after each layer keep only the (loss, bytes) partial plans that
no other partial plan beats on both; with a few dozen layers and a handful of dtypes the fronts
stay small. Exact (no loss discretisation, no greedy ratio heuristic that can strand budget).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    choice: str
    bytes: int
    loss: float  # metric loss when only this layer takes this choice


def _pareto(states: list[tuple[float, int, tuple[str, ...]]]) -> list[tuple[float, int, tuple[str, ...]]]:
    states.sort(key=lambda s: (s[0], s[1]))
    front, best_bytes = [], None
    for state in states:
        if best_bytes is None or state[1] < best_bytes:
            front.append(state)
            best_bytes = state[1]
    return front


def assign(options: dict[str, list[Option]], max_loss: float) -> dict[str, str]:
    """Cheapest choice per layer with summed (non-negative) loss <= max_loss.

    Every layer must offer a zero-loss option (its unquantized form) so a plan exists.
    """
    if max_loss < 0:
        raise ValueError(f"max_loss must be >= 0 (got {max_loss})")
    layers = list(options)
    states: list[tuple[float, int, tuple[str, ...]]] = [(0.0, 0, ())]
    for layer in layers:
        opts = options[layer]
        if not any(o.loss <= 0 for o in opts):
            raise ValueError(f"layer {layer} has no zero-loss option")
        states = _pareto([
            (loss + max(o.loss, 0.0), nbytes + o.bytes, (*choices, o.choice))
            for loss, nbytes, choices in states for o in opts
            if loss + max(o.loss, 0.0) <= max_loss + 1e-15
        ])
    best = min(states, key=lambda s: (s[1], s[0]))
    return dict(zip(layers, best[2]))
