"""What the built-in click log's multi-hot feature is worth: the default DLRM with and without it.

Trains the default DLRM (`TrainConfig()` defaults) on the built-in click log twice per seed:
once reading every categorical column, once with `recent_categories` (the categories of the
user's earlier clicks, multi-hot) left out of the dataset spec, and prints each one's test AUC,
overall and on returning users' rows (the only rows where the column holds ids).

    .venv/bin/python docs/multi_hot_signal.py --size tiny small --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from tasks.data import to_arrays
from tasks.evaluate import predict
from tasks.generator import SIZES, generate
from tasks.metrics import auc
from tasks.models import build, resolve
from tasks.train import train
from tasks.types import TrainConfig, parse_model_spec


def measure(size: str, seed: int) -> None:
    tables, data = generate(size, seed)
    without = data.model_copy(update={"categorical": tuple(
        c for c in data.categorical if c.name != "recent_categories")})
    for label, spec in (("with", data), ("without", without)):
        rows = {s: to_arrays(tables[s], spec, "ranking") for s in ("train", "valid", "test")}
        start = time.perf_counter()
        model = train(build(resolve(parse_model_spec({"family": "dlrm"}), spec), seed),
                      rows["train"], TrainConfig(seed=seed), valid=rows["valid"])
        test = rows["test"]
        pred = predict(model, test)
        returning = np.asarray(test.segments["user_type"]) == "returning"
        print(json.dumps({
            "size": size, "seed": seed, "recent_categories": label,
            "auc": round(auc(test.label, pred), 4),
            "auc_returning": round(auc(test.label[returning], pred[returning]), 4),
            "bayes_auc": round(data.bayes_auc or float("nan"), 4),
            "train_s": round(time.perf_counter() - start, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", default=["tiny"], choices=list(SIZES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    for size in args.size:
        for seed in args.seeds:
            measure(size, seed)


if __name__ == "__main__":
    main()
