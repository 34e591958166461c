"""Pooled tables: `nn.EmbeddingBag` as a lookup table plus a pooling step, so every stage that
compresses lookup tables compresses bags too.

`PooledTable` computes what `nn.EmbeddingBag` computes (modes sum, mean and max; a 2-D input of
fixed-size bags or a 1-D input with `offsets`, `include_last_offset`; `per_sample_weights` with
sum; `padding_idx` left out of the pooling) from any module that maps ids to vectors: its
child `table` starts as an `nn.Embedding` holding the bag's weight, and a stage swaps it for a
row-wise quantized, pruned, low-rank or tensor-train table like any other `nn.Embedding`. The
pooling uses only fixed-shape operations (a segment index from `bucketize`, `index_add` /
`scatter_reduce`), so a pooled table exports with `torch.export`.

`bags_as_tables(model)` replaces every `nn.EmbeddingBag` of a model this way, at every path
that reaches it (one table shared by two features stays one table).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

MODES = ("sum", "mean", "max")


class PooledTable(nn.Module):
    """`nn.EmbeddingBag(rows, dim, mode=..., padding_idx=..., include_last_offset=...)`
    over the id -> vector module `table`."""

    kind = "pooled_table"

    def __init__(self, rows: int, dim: int, mode: str = "mean", padding_idx: int | None = None,
                 include_last_offset: bool = False) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
        self.rows, self.dim, self.mode = rows, dim, mode
        self.padding_idx, self.include_last_offset = padding_idx, include_last_offset
        self.table: nn.Module = nn.Embedding(rows, dim)

    @classmethod
    def from_bag(cls, bag: nn.EmbeddingBag) -> PooledTable:
        if bag.max_norm is not None:
            raise ValueError("an nn.EmbeddingBag with max_norm renormalizes its rows at every "
                             "lookup, which a compressed table cannot; train it without "
                             "max_norm (or renormalize the weights) before compressing")
        rows, dim = bag.weight.shape
        module = cls(rows, dim, bag.mode, bag.padding_idx, bag.include_last_offset)
        with torch.no_grad():
            module.table.weight.copy_(bag.weight)  # type: ignore[operator]
        module.table.weight.requires_grad_(bag.weight.requires_grad)  # type: ignore[union-attr]
        return module

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,  # noqa: A002
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        flat, bag, bags = _segments(input, offsets, self.include_last_offset)
        vectors = self.table(flat)
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise ValueError("per_sample_weights is only supported with mode 'sum' (as "
                                 "nn.EmbeddingBag)")
            vectors = vectors * per_sample_weights.reshape(-1, 1).to(vectors.dtype)
        counted = torch.ones_like(flat, dtype=vectors.dtype) if self.padding_idx is None else \
            (flat != self.padding_idx).to(vectors.dtype)
        if self.mode == "max":
            masked = vectors.masked_fill(counted[:, None] == 0, float("-inf"))
            out = torch.full((bags, self.dim), float("-inf"), dtype=vectors.dtype,
                             device=vectors.device)
            out = out.scatter_reduce(0, bag[:, None].expand(-1, self.dim), masked, "amax")
            return out.masked_fill(torch.isinf(out), 0.0)  # an empty bag is zeros
        out = torch.zeros(bags, self.dim, dtype=vectors.dtype, device=vectors.device)
        out = out.index_add(0, bag, vectors * counted[:, None])
        if self.mode == "mean":
            n = torch.zeros(bags, dtype=vectors.dtype, device=vectors.device).index_add(
                0, bag, counted)
            out = out / n.clamp_min(1.0)[:, None]
        return out

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows": self.rows, "dim": self.dim, "mode": self.mode,
                "padding_idx": self.padding_idx,
                "include_last_offset": self.include_last_offset}


def _segments(input: torch.Tensor, offsets: torch.Tensor | None,  # noqa: A002
              include_last_offset: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(the ids, each id's bag, the number of bags) of an EmbeddingBag input."""
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("offsets must be None when input is 2-D (fixed-size bags)")
        bags, size = input.shape
        flat = input.reshape(-1)
        return flat, torch.arange(flat.numel(), device=input.device) // max(size, 1), bags
    if offsets is None:
        raise ValueError("a 1-D input needs offsets (the start of each bag)")
    starts = offsets[:-1] if include_last_offset else offsets
    position = torch.arange(input.numel(), device=input.device)
    bag = torch.bucketize(position, starts.to(position.dtype), right=True) - 1
    return input, bag, starts.numel()


def mean_of_slots(bag: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[B, K] ids (a multi-hot column's slots, PAD = -1 where a row has fewer) -> [B, dim]: the
    mean of the row's vectors from `bag` (an `nn.EmbeddingBag(mode="sum")` or a `PooledTable`
    of one); PAD slots weigh 0 and a row without ids gets zeros.

    Example: ids [[3, 9, -1]] -> (bag row 3 + bag row 9) / 2.
    """
    width = ids.shape[1]
    present = (ids >= 0).to(torch.float32)
    weights = present / present.sum(1, keepdim=True).clamp_min(1.0)
    flat = ids.clamp_min(0).reshape(-1)
    offsets = torch.arange(0, flat.numel(), width, device=flat.device)
    return bag(flat, offsets, per_sample_weights=weights.reshape(-1))


def bags_as_tables(model: nn.Module) -> nn.Module:
    """`model` with every `nn.EmbeddingBag` replaced by its `PooledTable`, in place, at every
    path that reaches it; the model itself is returned."""
    from tasks.modules import set_submodule

    bags = {id(m): (path, m) for path, m in model.named_modules()
            if type(m) is nn.EmbeddingBag}
    for path, bag in bags.values():
        set_submodule(model, path, PooledTable.from_bag(bag))  # type: ignore[arg-type]
    return model


def with_pooled_tables(model: nn.Module) -> nn.Module:
    """`model`, or - when it has `nn.EmbeddingBag` tables - a copy with each as a
    `PooledTable` (the same outputs; its table is an `nn.Embedding` the stages compress)."""
    if not any(type(m) is nn.EmbeddingBag for m in model.modules()):
        return model
    return bags_as_tables(copy.deepcopy(model))
