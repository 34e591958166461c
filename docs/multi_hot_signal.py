"""What the built-in click log's multi-hot feature is worth: each model with and without it.

Trains a family's default model (`TrainConfig()` defaults) on the built-in click log twice per
seed: once reading every categorical column, once with `recent_categories` (the categories of
the user's earlier clicks, multi-hot) left out of the dataset spec, and prints each one's main
test metric (AUC for the DLRM, Recall@50 for the two-tower model) with its 95% interval,
overall and on returning users' rows (the only rows where the column holds ids).

    .venv/bin/python docs/multi_hot_signal.py --size tiny small --family dlrm two_tower --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time

from tasks.data import to_arrays
from tasks.evaluate import evaluate
from tasks.generator import SIZES, generate
from tasks.models import build, resolve
from tasks.train import train
from tasks.types import TrainConfig, parse_model_spec

RETURNING = "[user_type=returning]"


def measure(size: str, family: str, seed: int) -> None:
    tables, data = generate(size, seed)
    without = data.model_copy(update={"categorical": tuple(
        c for c in data.categorical if c.name != "recent_categories")})
    for label, columns in (("with", data), ("without", without)):
        spec = resolve(parse_model_spec({"family": family}), columns)
        task = spec.problem_kind()
        rows = {s: to_arrays(tables[s], columns, task, spec.history_width())
                for s in ("train", "valid", "test")}
        start = time.perf_counter()
        model = train(build(spec, seed), rows["train"], TrainConfig(seed=seed),
                      valid=rows["valid"])
        metrics = evaluate(model, rows["test"], 0, timed=False)[0]
        main, returning = metrics.quality[metrics.main], metrics.quality.get(
            metrics.main + RETURNING)
        print(json.dumps({
            "size": size, "family": family, "seed": seed, "recent_categories": label,
            "metric": metrics.main, "value": round(main.value, 4),
            "ci95": [round(main.ci_low, 4), round(main.ci_high, 4)],
            "returning": round(returning.value, 4) if returning else None,
            "train_s": round(time.perf_counter() - start, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", default=["tiny"], choices=list(SIZES))
    parser.add_argument("--family", nargs="+", default=["dlrm"], choices=["dlrm", "two_tower"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    for size in args.size:
        for family in args.family:
            for seed in args.seeds:
                measure(size, family, seed)


if __name__ == "__main__":
    main()
