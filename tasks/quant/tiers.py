"""Which rows of a table are its head: the rows a tiered table keeps at the higher precision.

Recommendation ids are long-tailed: a small share of the items (or users, or feature values)
takes most of the lookups. A tiered table (`tasks.modules.embedding.TieredQuantEmbedding`)
spends its bits where the lookups are: the head rows at int8 or int4, the tail at fewer bits.

The head is counted, not guessed from the family: every table the plan tiers gets a forward
pre-hook that counts the ids it is asked for, while the model runs over (up to `max_rows` of)
the train split. That holds for any model whose tables are `nn.Embedding`s (a user's own class
too). A lookup of every row at once (a model scoring its whole catalogue) adds the same count
to every row and leaves the order as it was. Ties are broken by the larger row norm (a row the
train split never asked for is ranked by how far it moved from its initial values).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.data import Arrays
from tasks.determinism import THREADS, fixed_threads


def lookup_counts(model: nn.Module, paths: list[str], data: Arrays, max_rows: int = 100_000,
                  batch_size: int = 4096) -> dict[str, torch.Tensor]:
    """Path -> how often each row of that `nn.Embedding` was looked up over the first
    `max_rows` rows of `data` (int64 [rows])."""
    tables = {p: model.get_submodule(p) for p in paths}
    counts = {p: torch.zeros(t.weight.shape[0], dtype=torch.int64) for p, t in tables.items()}

    def counter(path: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            ids = args[0].reshape(-1).cpu()
            counts[path] += torch.bincount(ids, minlength=counts[path].numel())
        return hook

    handles = [t.register_forward_pre_hook(counter(p)) for p, t in tables.items()]
    device = next(iter(model.parameters())).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), fixed_threads(THREADS):
            for i in range(0, min(len(data), max_rows), batch_size):
                end = min(i + batch_size, max_rows)
                model(torch.from_numpy(np.ascontiguousarray(data.dense[i:end])).to(device),
                      torch.from_numpy(np.ascontiguousarray(data.sparse[i:end])).to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts


def head_rows(counts: torch.Tensor, weight: torch.Tensor, share: float) -> torch.Tensor:
    """The ids of the `share` most looked-up rows (at least one, at most all but one); ties
    go to the larger row norm."""
    rows = counts.numel()
    n = min(max(1, round(share * rows)), rows - 1)
    norm = weight.detach().float().cpu().norm(dim=1).double()
    key = counts.double() + 0.5 * norm / (norm.max() + 1e-12)  # the norm only breaks ties
    return torch.topk(key, n).indices.sort().values


def heads_of(model: nn.Module, tiered: list[str], share: float,
             data: Arrays) -> dict[str, torch.Tensor]:
    """Path -> head ids for every tiered table of `model`."""
    if not tiered:
        return {}
    counts = lookup_counts(model, tiered, data)
    return {p: head_rows(counts[p], model.get_submodule(p).weight, share) for p in tiered}
