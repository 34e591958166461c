"""What training, evaluation and the stages may call on a model and its layers.

Every model is an `nn.Module` with `forward(dense, sparse)` that carries the `spec` it was built
from (`RecModel`; DESIGN §12 says what forward returns per problem kind). Anything more is an
optional capability: a small Protocol, checked with `isinstance` where the code uses it. A
user's own class (family "custom", docs/byo-model.md) opts into one by having its members;
there is no base class to inherit.

    capability            members                           used by
    NormalizesDense       set_dense_statistics(mean, std)   prepare: train-split statistics
    HasCatalogue          set_catalogue(catalogue)          prepare: each item's feature ids
    CountsItems           set_item_frequency(clicks)        prepare: train clicks per item
    ScoresItems           score_items(dense, sparse, items) scores of chosen items only
    InBatchNegatives      ScoresItems + in_batch_negatives  train on the batch's clicked items
    CorrectsSamplingBias  sampling_log_q(items)             in-batch logits minus log q(item)
    HasDerivedIndex       refresh_index()                   finish: rebuild what weights imply

Layers the stages build answer two more, so measurements see through their storage:
`SparseWeight.dense_weight()` (pruned, 2:4) and `QuantizedWeight.dequantized_weight()`; and
structured pruning removes whole heads of a `MultiHeadAttention`.

Capabilities are methods, or plain attributes set in `__init__`, never buffers or submodules:
from Python 3.12 on, isinstance looks members up with `inspect.getattr_static`, which does not
see what `nn.Module.__getattr__` serves (parameters, buffers, submodules). `runtime_checkable`
checks that the members exist, not their signatures: the Protocols are the contract for
readers and mypy, the isinstance checks its gate.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from tasks.types import ModelSpec, ProblemKind


@runtime_checkable
class RecModel(Protocol):
    """Every model: built from `spec`, whose problem kind says what forward returns (ranking:
    one logit per row `[B]`; retrieval and next_item: a score per catalogue item `[B, items]`)."""

    spec: ModelSpec

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class NormalizesDense(Protocol):
    def set_dense_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The train split's per-feature mean and std `[num_dense]` (std > 0), before
        training; the model standardizes its dense inputs with them."""


@runtime_checkable
class HasCatalogue(Protocol):
    def set_catalogue(self, catalogue: torch.Tensor) -> None:
        """Each catalogue item's feature ids `[items, F]` (train split), before training."""


@runtime_checkable
class CountsItems(Protocol):
    def set_item_frequency(self, clicks: torch.Tensor) -> None:
        """Clicks per catalogue item `[items]` on the train split, before training."""


@runtime_checkable
class ScoresItems(Protocol):
    def score_items(self, dense: torch.Tensor, sparse: torch.Tensor,
                    items: torch.Tensor) -> torch.Tensor:
        """`[B, len(items)]` scores of these items (forward scores the whole catalogue)."""


@runtime_checkable
class InBatchNegatives(ScoresItems, Protocol):
    """Trained on in-batch negatives (the batch's clicked items, `score_items`) while
    `in_batch_negatives` is true; otherwise by softmax over the catalogue."""

    in_batch_negatives: bool


@runtime_checkable
class CorrectsSamplingBias(Protocol):
    def sampling_log_q(self, items: torch.Tensor) -> torch.Tensor:
        """log of each item's chance to be an in-batch negative (its share of the clicks),
        subtracted from its in-batch training logits (Yi et al., 2019)."""


@runtime_checkable
class HasDerivedIndex(Protocol):
    def refresh_index(self) -> None:
        """Rebuild what is derived from the weights (two-tower: the item index); called after
        every change of the weights and before scoring."""


# --- layers --------------------------------------------------------------------------------
@runtime_checkable
class SparseWeight(Protocol):
    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense `[out, in]` matrix, pruned entries zero."""


@runtime_checkable
class QuantizedWeight(Protocol):
    def dequantized_weight(self) -> torch.Tensor:
        """The weight as a float `[out, in]` matrix, as the quantized codes give it."""


@runtime_checkable
class MultiHeadAttention(Protocol):
    """Attention whose heads are `head_dim` wide, with child projections `q`, `k`, `v`, `o`
    (Linear layers; the head count follows their widths). The children are submodules, so
    `attention_projections` finds them, not isinstance."""

    head_dim: int


PROJECTIONS = ("q", "k", "v", "o")


def attention_projections(module: nn.Module) -> dict[str, nn.Module] | None:
    """`{"q": .., "k": .., "v": .., "o": ..}` of a `MultiHeadAttention`, else None."""
    if not isinstance(module, MultiHeadAttention):
        return None
    children = dict(module.named_children())
    if not all(name in children for name in PROJECTIONS):
        return None
    return {name: children[name] for name in PROJECTIONS}


def spec_of(model: nn.Module) -> ModelSpec:
    """The spec `model` was built from (stages keep it current: distill's student has its own)."""
    if not isinstance(model, RecModel):
        raise TypeError(f"{type(model).__name__} has no `spec`: build models with "
                        "tasks.models.build(spec), which sets it, or set model.spec to the "
                        "ModelSpec the module was built from")
    return model.spec


def problem_kind(model: nn.Module) -> ProblemKind:
    """ranking, retrieval or next_item: what forward returns and which metrics judge it."""
    return spec_of(model).problem_kind()
