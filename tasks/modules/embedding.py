"""Compressed embedding tables. Each holds plain tensors only and rebuilds from its manifest."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tasks.quant.primitives import affine_codes, mse_row_ranges, pack, unpack

_FUSED = {  # the resolved overloads: calling the packet re-resolves it on every lookup
    8: torch.ops.quantized.embedding_bag_byte_rowwise_offsets.default,
    4: torch.ops.quantized.embedding_bag_4bit_rowwise_offsets.default,
    2: torch.ops.quantized.embedding_bag_2bit_rowwise_offsets.default,
}


_ARANGE: dict[torch.dtype, torch.Tensor] = {}


def _offsets(n: int, dtype: torch.dtype) -> torch.Tensor:
    """0..n-1 (one id per bag), from a cached range: the fused kernels' offsets argument costs
    a fresh arange on every lookup otherwise."""
    cached = _ARANGE.get(dtype)
    if cached is None or cached.numel() < n:
        with torch.inference_mode(False):
            cached = _ARANGE[dtype] = torch.arange(max(n, 4096), dtype=dtype)
    return cached[:n]


class RowWiseQuantEmbedding(nn.Module):
    """Row-wise affine int8 / int4 / int2 table in fbgemm's fused layout.

    Each row is `dim * bits / 8` bytes of codes (int4: two per byte, int2: four), then its
    scale and offset (fp32 for int8, fp16 for int4/int2). Lookups run on torch's fused
    `embedding_bag_{byte,4bit,2bit}_rowwise_offsets` CPU kernels on the packed bytes; the
    table is never expanded. Row ranges: min/max, or the MSE-optimal clip per row ("mse"),
    which is what keeps AUC at 4 and 2 bits.
    """

    kind = "rowwise_quant_embedding"

    def __init__(self, rows: int, dim: int, bits: int) -> None:
        super().__init__()
        if bits not in _FUSED:
            raise ValueError(f"bits must be 8, 4 or 2 (got {bits})")
        self.bits, self.dim = bits, dim
        tail = 8 if bits == 8 else 4
        # a width that does not fill whole bytes is padded with zero codes (sliced off on read)
        self.register_buffer("packed", torch.zeros(rows, -(-dim * bits // 8) + tail,
                                                   dtype=torch.uint8))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int, row_range: str = "mse") -> RowWiseQuantEmbedding:
        w = weight.detach().float().cpu().contiguous()
        rows, dim = w.shape
        if row_range == "mse" and bits < 8:
            lo, hi = mse_row_ranges(w, bits)
        elif row_range in ("mse", "minmax"):
            lo, hi = w.min(dim=1).values, w.max(dim=1).values
        else:
            raise ValueError(f"row_range must be 'minmax' or 'mse' (got {row_range!r})")
        module = cls(rows, dim, bits)
        if bits == 8:
            codes, scale, offset = affine_codes(w, lo, hi, 8)
            params = torch.stack([scale, offset], 1).float()
        else:
            # fp16 scale/offset: quantize with the rounded parameters the kernel will use
            scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8).half()
            offset = lo.half()
            codes, _, _ = affine_codes(w, offset.float(),
                                       offset.float() + scale.float() * (2**bits - 1), bits)
            params = torch.stack([scale, offset], 1)
        pad = -dim % (8 // bits)
        codes = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
        module.packed.copy_(torch.cat([pack(codes, bits), params.view(torch.uint8)], dim=1))
        return module

    def _parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tail = 8 if self.bits == 8 else 4
        ptype = torch.float32 if self.bits == 8 else torch.float16
        params = self.packed[:, -tail:].contiguous().view(ptype).float()
        codes = unpack(self.packed[:, :-tail], self.bits, self.dim)
        return codes, params[:, 0], params[:, 1]

    def dequantize(self) -> torch.Tensor:
        codes, scale, offset = self._parts()
        return codes.float() * scale[:, None] + offset[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        packed = self._buffers["packed"]  # (not Module.__getattr__: this is the hot path)
        assert packed is not None
        if not packed.is_cpu:  # the fused kernels are CPU-only
            flat = ids.reshape(-1)
            return self.dequantize().to(packed.device)[flat].reshape(*ids.shape, -1)
        flat = ids.reshape(-1).contiguous()
        out = _FUSED[self.bits](packed, flat, _offsets(flat.numel(), flat.dtype), False, 0,
                                False, None, None, False)
        if out.shape[1] != self.dim:  # a width padded to whole bytes
            out = out[:, :self.dim]
        return out if ids.dim() == 1 else out.reshape(*ids.shape, -1)

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows": self.packed.shape[0], "dim": self.dim,
                "bits": self.bits}


HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class HalfEmbedding(nn.Module):
    """fp16 or bf16 table; rows are gathered in half precision and widened to fp32."""

    kind = "half_embedding"

    def __init__(self, rows: int, dim: int, dtype: str) -> None:
        super().__init__()
        self.dtype_name = dtype
        self.register_buffer("weight", torch.zeros(rows, dim, dtype=HALF_DTYPES[dtype]))

    @classmethod
    def from_float(cls, weight: torch.Tensor, dtype: str) -> HalfEmbedding:
        module = cls(*weight.shape, dtype)
        module.weight.copy_(weight.detach())
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight).float()

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows": self.weight.shape[0], "dim": self.weight.shape[1],
                "dtype": self.dtype_name}


class TieredQuantEmbedding(nn.Module):
    """A row-wise table in two precisions: the `head_rows` most looked-up rows (the head of a
    long-tailed id distribution) at `head_bits`, the rest at `tail_bits` (both
    `RowWiseQuantEmbedding`s, fused kernels on CPU).

    `head_ids` holds the head's ids in ascending order (int32). An id's place follows from one
    `searchsorted`: `p` head ids are smaller than it, so it is head row `p` when
    `head_ids[p]` is that id, and tail row `id - p` otherwise. No per-row map is stored: the
    index costs 4 bytes per head row. Both parts are looked up for every id and the right one
    is kept (`torch.where`), so the forward has no data-dependent shape (it exports as it is).
    """

    kind = "tiered_quant_embedding"

    def __init__(self, rows: int, dim: int, head_rows: int, head_bits: int,
                 tail_bits: int) -> None:
        super().__init__()
        if not 0 < head_rows < rows:
            raise ValueError(f"head_rows must be in (0, {rows}) (got {head_rows})")
        self.rows, self.dim = rows, dim
        self.register_buffer("head_ids", torch.zeros(head_rows, dtype=torch.int32))
        self.head = RowWiseQuantEmbedding(head_rows, dim, head_bits)
        self.tail = RowWiseQuantEmbedding(rows - head_rows, dim, tail_bits)

    @classmethod
    def from_float(cls, weight: torch.Tensor, head: torch.Tensor, head_bits: int,
                   tail_bits: int, row_range: str = "mse") -> TieredQuantEmbedding:
        """`head`: the ids kept at `head_bits` (any order, no repeats)."""
        w = weight.detach().float().cpu()
        rows = w.shape[0]
        ids = torch.unique(head.cpu().long())  # sorted
        if ids.numel() != head.numel() or (ids.numel() and (ids[0] < 0 or ids[-1] >= rows)):
            raise ValueError(f"head ids must be distinct rows of the {rows}-row table")
        is_head = torch.zeros(rows, dtype=torch.bool)
        is_head[ids] = True
        module = cls(rows, w.shape[1], ids.numel(), head_bits, tail_bits)
        module.head_ids.copy_(ids.to(torch.int32))
        module.head = RowWiseQuantEmbedding.from_float(w[is_head], head_bits, row_range)
        module.tail = RowWiseQuantEmbedding.from_float(w[~is_head], tail_bits, row_range)
        return module

    def _places(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        head_ids = self.head_ids
        flat = flat.to(head_ids.dtype)
        before = torch.searchsorted(head_ids, flat)  # head ids smaller than the id
        at = before.clamp(max=head_ids.numel() - 1)
        is_head = head_ids[at] == flat
        tail_at = (flat - before).clamp(0, self.rows - head_ids.numel() - 1)
        return is_head, at, tail_at

    def dequantize(self) -> torch.Tensor:
        out = torch.empty(self.rows, self.dim)
        is_head = torch.zeros(self.rows, dtype=torch.bool)
        is_head[self.head_ids.long()] = True
        out[is_head] = self.head.dequantize()
        out[~is_head] = self.tail.dequantize()
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        is_head, at, tail_at = self._places(flat)
        out = torch.where(is_head[:, None], self.head(at), self.tail(tail_at))
        return out if ids.dim() == 1 else out.reshape(*ids.shape, -1)

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows": self.rows, "dim": self.dim,
                "head_rows": self.head_ids.numel(), "head_bits": self.head.bits,
                "tail_bits": self.tail.bits}
