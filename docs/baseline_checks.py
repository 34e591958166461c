"""The gate's checks before compression, on the built-in data, in one process (no stack).

Trains a family's default baseline on a built-in size, then prints its margin over each
trivial predictor and the resolution of the default budget (tasks/baselines.py) - the
numbers a run reports in `trivial_baselines` and `resolution`.

    .venv/bin/python docs/baseline_checks.py --size small --family two_tower --epochs 3
"""

from __future__ import annotations

import argparse
import json
import time

from tasks.baselines import compare_trivial, resolution, trivial_predictions
from tasks.data import item_slot, to_arrays
from tasks.defaults import default_budget
from tasks.evaluate import predict
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.train import train
from tasks.types import DEFAULT_KS, MAIN_METRIC, TrainConfig, parse_model_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--family", default="dlrm", choices=["dlrm", "two_tower", "sasrec"])
    parser.add_argument("--epochs", type=int, default=None,
                        help="most epochs (default: TrainConfig's, scaled to the rows)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tables, data = generate(args.size, args.seed)
    spec = resolve(parse_model_spec({"family": args.family}), data)
    task = spec.problem_kind()
    train_rows, valid, test = (to_arrays(tables[s], data, task, spec.history_width())
                               for s in ("train", "valid", "test"))
    start = time.perf_counter()
    model = train(build(spec, args.seed), train_rows,
                  TrainConfig(epochs=args.epochs, seed=args.seed), valid=valid)
    pred = predict(model, test)
    n_items = next(c.cardinality for c in data.categorical if c.name == data.item_id)
    trivial = trivial_predictions(task, train_rows, test,
                                  item_slot(data) if task == "ranking" else None, n_items)
    main_metric = MAIN_METRIC[task]
    print(json.dumps({"size": args.size, "family": args.family, "epochs": args.epochs,
                      "seed": args.seed, "test_rows": len(test),
                      "train_s": round(time.perf_counter() - start, 1)}))
    budget = default_budget(args.family)
    for t in compare_trivial(task, main_metric, test, trivial, pred, budget.confidence):
        print(json.dumps({"trivial": t.model_dump(mode="json")}))
    for r in resolution(task, test, pred, budget, main_metric, DEFAULT_KS):
        print(json.dumps({"resolution": r.model_dump(mode="json")}))


if __name__ == "__main__":
    main()
