"""The quantization schemes: one registry, name -> how to build the compressed module and the
properties every stage branches on.

`quantize` reads it for `QuantizeConfig.linear` / `.embeddings`, `calibrate` for the dtypes whose
per-layer sensitivity it measures, mixed precision for the choices it may make, and the types
package builds its `LinearQuant` / `EmbeddingQuant` Literals from LINEAR_SCHEMES /
EMBEDDING_SCHEMES. Adding a dtype is one entry below (plus its module class in tasks/modules if
no existing one fits, and its tests).

This module imports no torch: the types package reads it, and Ray workers and the Prefect UI form
load the types. So each builder imports its module class when it runs.

Example:
    >>> scheme = LINEAR["int4_weight_only"]
    >>> scheme.bits, scheme.group_wise, scheme.needs_ranges
    (4, True, False)
    >>> small = scheme.build(layer, scheme, BuildArgs(group_size=32))  # a WeightOnlyLinear
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from torch import nn

Range = tuple[float, float]
M = TypeVar("M", bound="nn.Module")


@dataclass(frozen=True)
class BuildArgs:
    """What a builder may read besides the float module: the config's knobs and the context's
    calibrated ranges. The quantize stage resolves them per layer."""

    path: str = ""  # the module's path in the model (for messages)
    group_size: int | None = None  # group-wise schemes: one scale per this many input columns
    row_range: str = "mse"  # row-wise tables: "mse" or "minmax" per-row range
    act_range: tuple[Range, Range] | None = None  # schemes that need_ranges: (input, output)
    head: Any = None  # tiered tables: the ids (a tensor) kept at the head dtype


@dataclass(frozen=True)
class Scheme(Generic[M]):
    """One dtype a Linear layer (M = nn.Linear) or an embedding table (M = nn.Embedding) can get.

    Args:
        name: the value of `QuantizeConfig.linear` / `.embeddings` and of a sensitivity row.
        build: (float module, this scheme, BuildArgs) -> the compressed module; returns the
            float module itself when the scheme keeps it ("none").
        bits: bits per stored weight (32: kept as float, 16: half precision); a tiered
            table's tail rows.
        head_bits: tiered tables: the bits of the head rows (the most looked-up share
            `QuantizeConfig.head_share` of the rows, counted on the train split).
        half: "fp16" or "bf16" for a half-precision scheme (the stored float format).
        group_wise: weight-only; accepts `QuantizeConfig.group_size`.
        needs_ranges: needs static activation ranges from the calibrate stage's table.
        row_range: `QuantizeConfig.row_range` changes the result (sub-byte row-wise tables).
        measured: calibrate measures every layer's sensitivity under it, so mixed precision
            can choose it. Costs one evaluation per layer at calibration.
    """

    name: str
    build: Callable[[M, Scheme[M], BuildArgs], nn.Module]
    bits: int
    half: str | None = None
    head_bits: int | None = None
    group_wise: bool = False
    needs_ranges: bool = False
    row_range: bool = False
    measured: bool = False

    def __post_init__(self) -> None:
        if self.measured and self.needs_ranges:  # calibrate measures before ranges exist
            raise ValueError(f"scheme {self.name}: measured=True needs no calibrated ranges "
                             "(calibrate measures sensitivity without them); set one to False")


# --- builders: each imports its module class when called (this file stays torch-free) -------

def _keep(module: M, scheme: Scheme[M], args: BuildArgs) -> nn.Module:
    return module


def _dynamic_int8(layer: nn.Linear, scheme: Scheme[nn.Linear], args: BuildArgs) -> nn.Module:
    from tasks.modules.linear import DynamicInt8Linear

    return DynamicInt8Linear.from_float(layer)


def _static_int8(layer: nn.Linear, scheme: Scheme[nn.Linear], args: BuildArgs) -> nn.Module:
    from tasks.modules.linear import StaticInt8Linear

    if args.act_range is None:
        raise ValueError(f"{scheme.name} needs calibrated ranges for {args.path}")
    return StaticInt8Linear.from_float_calibrated(layer, *args.act_range)


def _weight_only(layer: nn.Linear, scheme: Scheme[nn.Linear], args: BuildArgs) -> nn.Module:
    from tasks.modules.linear import WeightOnlyLinear

    return WeightOnlyLinear.from_float(layer, scheme.bits, args.group_size)


def _half_linear(layer: nn.Linear, scheme: Scheme[nn.Linear], args: BuildArgs) -> nn.Module:
    from tasks.modules.linear import HalfLinear

    assert scheme.half is not None
    return HalfLinear.from_float(layer, scheme.half)


def _row_wise(table: nn.Embedding, scheme: Scheme[nn.Embedding], args: BuildArgs) -> nn.Module:
    from tasks.modules.embedding import RowWiseQuantEmbedding

    return RowWiseQuantEmbedding.from_float(table.weight, scheme.bits, args.row_range)


def _tiered(table: nn.Embedding, scheme: Scheme[nn.Embedding], args: BuildArgs) -> nn.Module:
    from tasks.modules.embedding import RowWiseQuantEmbedding, TieredQuantEmbedding

    assert scheme.head_bits is not None
    if args.head is None:
        raise ValueError(f"{scheme.name} needs the head rows of {args.path} (counted on the "
                         "train split by the quantize stage)")
    rows = table.weight.shape[0]
    if args.head.numel() == 0:  # no head: every row is a tail row
        return RowWiseQuantEmbedding.from_float(table.weight, scheme.bits, args.row_range)
    if args.head.numel() >= rows:
        return RowWiseQuantEmbedding.from_float(table.weight, scheme.head_bits, args.row_range)
    return TieredQuantEmbedding.from_float(table.weight, args.head, scheme.head_bits,
                                           scheme.bits, args.row_range)


def _half_table(table: nn.Embedding, scheme: Scheme[nn.Embedding], args: BuildArgs) -> nn.Module:
    from tasks.modules.embedding import HalfEmbedding

    assert scheme.half is not None
    return HalfEmbedding.from_float(table.weight, scheme.half)


# --- the registries (their order is the order of the config's Literal and of the UI form) ---

LINEAR: dict[str, Scheme[nn.Linear]] = {s.name: s for s in (
    Scheme("none", _keep, 32, measured=True),
    Scheme("dynamic_int8", _dynamic_int8, 8, measured=True),
    Scheme("static_int8", _static_int8, 8, needs_ranges=True),
    Scheme("int8_weight_only", _weight_only, 8, group_wise=True, measured=True),
    Scheme("int4_weight_only", _weight_only, 4, group_wise=True, measured=True),
    Scheme("fp16", _half_linear, 16, half="fp16"),
    Scheme("bf16", _half_linear, 16, half="bf16"),
)}

EMBEDDING: dict[str, Scheme[nn.Embedding]] = {s.name: s for s in (
    Scheme("none", _keep, 32, measured=True),
    Scheme("rowwise_int8", _row_wise, 8, measured=True),
    Scheme("rowwise_int4", _row_wise, 4, row_range=True, measured=True),
    Scheme("rowwise_int2", _row_wise, 2, row_range=True, measured=True),
    Scheme("fp16", _half_table, 16, half="fp16"),
    Scheme("bf16", _half_table, 16, half="bf16"),
    # head rows at the first dtype, the long tail at the second (QuantizeConfig.head_share)
    Scheme("tiered_int8_int4", _tiered, 4, head_bits=8, row_range=True),
    Scheme("tiered_int8_int2", _tiered, 2, head_bits=8, row_range=True),
    Scheme("tiered_int4_int2", _tiered, 2, head_bits=4, row_range=True),
)}

LINEAR_SCHEMES: tuple[str, ...] = tuple(LINEAR)
EMBEDDING_SCHEMES: tuple[str, ...] = tuple(EMBEDDING)


def linear_scheme(name: str) -> Scheme[nn.Linear]:
    if name not in LINEAR:
        raise ValueError(f"quantize.linear: unknown choice {name!r} (one of {', '.join(LINEAR)})")
    return LINEAR[name]


def embedding_scheme(name: str) -> Scheme[nn.Embedding]:
    if name not in EMBEDDING:
        raise ValueError(f"quantize.embeddings: unknown choice {name!r} "
                         f"(one of {', '.join(EMBEDDING)})")
    return EMBEDDING[name]


__all__ = ["EMBEDDING", "EMBEDDING_SCHEMES", "LINEAR", "LINEAR_SCHEMES", "BuildArgs", "Scheme",
           "embedding_scheme", "linear_scheme"]
