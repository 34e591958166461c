"""Compressed building blocks that stages swap into a model.

Each holds only plain tensors (so it saves to safetensors) and can be rebuilt empty from the
shape arguments in its `manifest()` entry: `tasks.artifacts` rebuilds a compressed model by
building the base spec, swapping in these modules at the recorded paths, and loading weights.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class RowWiseInt8Embedding(nn.Module):
    """uint8 codes with a per-row fp32 scale and offset: w ~= code * scale + offset.

    Each row's range is its own min/max, so a row of small values keeps its precision whatever
    the other rows hold. Stored in fbgemm's fused layout, one uint8 row of dim + 8 bytes
    (codes, then scale and offset as fp32), so lookups run on torch's fused
    `embedding_bag_byte_rowwise_offsets` kernel: 4 bytes -> 1 byte per value (+8 per row).
    """

    kind = "rowwise_int8_embedding"

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("packed", torch.zeros(rows, dim + 8, dtype=torch.uint8))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> RowWiseInt8Embedding:
        w = weight.detach().float().cpu().contiguous()
        module = cls(*w.shape)
        module.packed.copy_(torch.ops.quantized.embedding_bag_byte_prepack(w))
        return module

    def dequantize(self) -> torch.Tensor:
        return torch.ops.quantized.embedding_bag_byte_unpack(self.packed.cpu())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed.device.type != "cpu":  # fused kernel is CPU-only: gather, dequantize
            rows = self.packed[ids]
            scale = rows[..., -8:-4].contiguous().view(torch.float32)
            offset = rows[..., -4:].contiguous().view(torch.float32)
            return rows[..., :-8].float() * scale + offset
        flat = ids.reshape(-1).contiguous()
        offsets = torch.arange(flat.numel(), dtype=flat.dtype)
        out = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
            self.packed, flat, offsets, False, 0, False, None, None, False)
        return out.reshape(*ids.shape, -1)

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows": self.packed.shape[0], "dim": self.packed.shape[1] - 8}


class DynamicInt8Linear(nn.Module):
    """Linear with int8 per-output-channel weights; activations quantized per batch at run time.

    Runs on torch's fbgemm/x86 dynamic-quantized kernel (`quantized::linear_dynamic`); the
    packed weight is derived from the stored int8 tensor on first use and never saved.
    """

    kind = "dynamic_int8_linear"

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features))
        self._packed: Any = None
        self._register_load_state_dict_pre_hook(self._invalidate)

    def _invalidate(self, *args: Any, **kwargs: Any) -> None:
        self._packed = None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> DynamicInt8Linear:
        w = linear.weight.detach().float()
        scale = (w.abs().max(dim=1).values / 127.0).clamp_min(1e-12)
        module = cls(linear.in_features, linear.out_features)
        module.weight_int8.copy_(torch.round(w / scale[:, None]).clamp(-127, 127))
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def _pack(self) -> Any:
        zero_points = torch.zeros(self.weight_scale.shape[0], dtype=torch.int64)
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; the kernel stays
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(
                self.weight_int8.cpu(), self.weight_scale.double().cpu(), zero_points, axis=0
            )
        return torch.ops.quantized.linear_prepack(qweight, self.bias.float().cpu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # no dynamic-int8 kernel off CPU: dequantize the weight
            w = self.weight_int8.float() * self.weight_scale[:, None]
            return F.linear(x, w, self.bias)
        if self._packed is None:
            self._packed = self._pack()
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.weight_int8.shape[1],
                "out_features": self.weight_int8.shape[0]}


COMPRESSED_MODULES: dict[str, type[nn.Module]] = {
    RowWiseInt8Embedding.kind: RowWiseInt8Embedding,
    DynamicInt8Linear.kind: DynamicInt8Linear,
}


def manifest_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Paths and shapes of every compressed module in `model` (derived, never stored apart)."""
    return {name: m.manifest() for name, m in model.named_modules()
            if type(m) in COMPRESSED_MODULES.values()}


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def apply_manifest(model: nn.Module, manifest: dict[str, dict[str, Any]]) -> nn.Module:
    """Swap in empty compressed modules at the recorded paths (weights are loaded after)."""
    for path, entry in manifest.items():
        args = {k: v for k, v in entry.items() if k != "kind"}
        if entry["kind"] not in COMPRESSED_MODULES:
            raise ValueError(f"model manifest: unknown module kind {entry['kind']!r} at {path}")
        set_submodule(model, path, COMPRESSED_MODULES[entry["kind"]](**args))
    return model
