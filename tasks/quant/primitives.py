"""Affine quantization primitives and sub-byte packing.

Asymmetric (row-wise, embedding) codes: q = round((w - offset) / scale) in [0, 2^bits - 1],
w ~= q * scale + offset. Symmetric (weights of Linear layers) codes: q = round(w / scale) in
[-(2^(bits-1) - 1), 2^(bits-1) - 1]. Packing puts 8/bits codes in one byte, the first value in
the lowest bits — fbgemm's layout, so packed tables run on torch's fused kernels.
"""

from __future__ import annotations

import torch


def qmax(bits: int) -> int:
    return 2**bits - 1


def affine_codes(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8), scale and offset per row for the range [lo, hi] of each row."""
    scale = ((hi - lo) / qmax(bits)).clamp_min(1e-8)
    codes = torch.round((w - lo[:, None]) / scale[:, None]).clamp(0, qmax(bits))
    return codes.to(torch.uint8), scale, lo


def affine_dequant(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale[:, None] + offset[:, None]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, dim] uint8 codes < 2^bits -> [rows, dim * bits / 8] bytes (first value lowest)."""
    per_byte = 8 // bits
    rows, dim = codes.shape
    if dim % per_byte:
        raise ValueError(f"width {dim} is not a multiple of {per_byte} ({bits}-bit packing)")
    grouped = codes.to(torch.int32).reshape(rows, dim // per_byte, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * bits
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    values = (packed.to(torch.int32)[..., None] >> shifts) & qmax(bits)
    return values.reshape(*packed.shape[:-1], -1)[..., :dim].to(torch.uint8)


def mse_row_ranges(w: torch.Tensor, bits: int, grid: int = 8, max_shrink: float = 0.35,
                   chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping range [lo, hi] minimising the row's quantization MSE.

    Searches lo = min + a*(max-min), hi = max - b*(max-min) over a grid of (a, b) in
    [0, max_shrink]^2: a few outliers in a row no longer spend most of the 2^bits levels. At
    8 bits min/max is already near optimal; at 4 and 2 bits this is what keeps AUC.
    """
    steps = torch.linspace(0, max_shrink, grid)
    a, b = torch.meshgrid(steps, steps, indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    los, his = [], []
    for start in range(0, w.shape[0], chunk_rows):
        x = w[start:start + chunk_rows].float()
        mn, mx = x.min(dim=1).values, x.max(dim=1).values
        span = (mx - mn)[:, None]
        lo = mn[:, None] + a[None, :] * span  # [rows, candidates]
        hi = mx[:, None] - b[None, :] * span
        scale = ((hi - lo) / qmax(bits)).clamp_min(1e-8)
        q = torch.round((x[:, None, :] - lo[..., None]) / scale[..., None]).clamp(0, qmax(bits))
        err = ((q * scale[..., None] + lo[..., None]) - x[:, None, :]).pow(2).sum(-1)
        best = err.argmin(dim=1)
        idx = torch.arange(x.shape[0])
        los.append(lo[idx, best])
        his.append(hi[idx, best])
    return torch.cat(los), torch.cat(his)


def symmetric_codes(w: torch.Tensor, bits: int,
                    group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and scales [out, groups] for a Linear weight [out, in] (per-channel when
    group_size is None, else one scale per `group_size` input columns)."""
    out_f, in_f = w.shape
    g = group_size or in_f
    if in_f % g:
        raise ValueError(f"group_size {g} does not divide the layer width {in_f}")
    grouped = w.float().reshape(out_f, in_f // g, g)
    limit = 2 ** (bits - 1) - 1
    scale = (grouped.abs().amax(dim=-1) / limit).clamp_min(1e-12)
    codes = torch.round(grouped / scale[..., None]).clamp(-limit, limit)
    return codes.reshape(out_f, in_f).to(torch.int8), scale


def symmetric_dequant(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out_f, in_f = codes.shape
    groups = scale.shape[1]
    return (codes.float().reshape(out_f, groups, -1) * scale[..., None]).reshape(out_f, in_f)
