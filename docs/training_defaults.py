"""What the baseline's training defaults give: the ranker's margin over its trivial predictors.

Trains the default DLRM on the built-in click log twice, with the training defaults of before
Dec 2026 (3 epochs of 2,048 rows a step, whatever the data's size) and with today's
(`TrainConfig()`: a batch size scaled to the rows, at least `min_steps` optimizer steps), and
prints, for each, the test AUC and its paired margin over the global and per-item click rate
(the run's preflight check, tasks/baselines.py; `margin_low` > 0 passes it).

    .venv/bin/python docs/training_defaults.py --size tiny 100k small
    .venv/bin/python docs/training_defaults.py --size tiny 100k small --embedding-l2 1e-4 1e-3

`--embedding-l2 V ...` adds today's defaults with `embedding_l2=V` (an L2 on the embedding
vectors each batch looks up) beside them.

`100k` is the generator at 100,000 rows over 4,000 users and 1,682 items (the shape of a
public 100k-rating data set).
"""

from __future__ import annotations

import argparse
import json
import time

from tasks.baselines import compare_trivial, trivial_predictions
from tasks.data import item_slot, to_arrays
from tasks.evaluate import predict
from tasks.generator import SIZES, GeneratorSize, generate
from tasks.models import build, resolve
from tasks.train import train
from tasks.types import TrainConfig, parse_model_spec

SIZE_100K = GeneratorSize(users=4_000, items=1_682, queries=1_000, rows=100_000)
SETTINGS = {"before": TrainConfig(epochs=3, batch_size=2048),
            "now": TrainConfig()}


def measure(size: str, seed: int, settings: dict[str, TrainConfig]) -> None:
    tables, data = generate(SIZE_100K if size == "100k" else size, seed)
    spec = resolve(parse_model_spec({"family": "dlrm"}), data)
    rows = {s: to_arrays(tables[s], data, "ranking") for s in ("train", "valid", "test")}
    trivial = trivial_predictions("ranking", rows["train"], rows["test"], item_slot(data), 0)
    for label, cfg in settings.items():
        cfg = cfg.model_copy(update={"seed": seed})
        start = time.perf_counter()
        model = train(build(spec, seed), rows["train"], cfg, valid=rows["valid"])
        pred = predict(model, rows["test"])
        margins = {t.name: {"value": round(t.value, 4), "margin": round(t.margin, 4),
                            "margin_low": round(t.margin_low, 4)}
                   for t in compare_trivial("ranking", "auc", rows["test"], trivial, pred, 0.95)}
        n = len(rows["train"])
        print(json.dumps({
            "size": size, "seed": seed, "defaults": label, "train_rows": n,
            "batch_size": cfg.rows_per_step(n), "max_epochs": cfg.passes(n),
            "auc": round(next(iter(margins.values()))["value"] + next(
                iter(margins.values()))["margin"], 4),
            "bayes_auc": round(data.bayes_auc or float("nan"), 4),
            "trivial": margins, "train_s": round(time.perf_counter() - start, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", default=["tiny", "100k"],
                        choices=[*SIZES, "100k"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedding-l2", nargs="*", type=float, default=[])
    args = parser.parse_args()
    settings = SETTINGS | {f"now, embedding_l2={v:g}": TrainConfig(embedding_l2=v)
                           for v in args.embedding_l2}
    for size in args.size:
        measure(size, args.seed, settings)


if __name__ == "__main__":
    main()
