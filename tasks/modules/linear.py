"""Compressed Linear layers. Each holds plain tensors only and rebuilds from its manifest."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tasks.modules.embedding import HALF_DTYPES
from tasks.quant.primitives import pack, symmetric_codes, symmetric_dequant, unpack


def _per_channel_qweight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    zero_points = torch.zeros(scale.shape[0], dtype=torch.int64)
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated; kernels remain
        warnings.simplefilter("ignore", UserWarning)
        return torch._make_per_channel_quantized_tensor(
            codes.cpu(), scale.double().cpu(), zero_points, axis=0)


def _dynamic_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """What fbgemm's dynamic linear does to its input: per-tensor affine uint8 over the
    batch's range (with zero in it), at reduced range (0..127), as `linear_dynamic(..., True)`."""
    lo, hi = x.min().clamp_max(0.0), x.max().clamp_min(0.0)
    scale = float((hi - lo) / 127) or 1.0
    zero = int(torch.clamp(torch.round(-lo / scale), 0, 127))
    return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 127)


class DynamicInt8Linear(nn.Module):
    """int8 per-output-channel weights; activations quantized per batch at run time.

    Runs on torch's fbgemm/x86 kernel (`quantized::linear_dynamic`); the packed weight is
    derived from the stored int8 tensor on first use and never saved.
    """

    kind = "dynamic_int8_linear"

    def __init__(self, in_features: int, out_features: int, relu: bool = False) -> None:
        super().__init__()
        self.relu = relu  # fused ReLU (`quantized::linear_relu_dynamic`)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features))
        self._packed: Any = None
        self._register_load_state_dict_pre_hook(self._invalidate)

    def _invalidate(self, *args: Any, **kwargs: Any) -> None:
        self._packed = None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> DynamicInt8Linear:
        module = cls(linear.in_features, linear.out_features)
        codes, scale = symmetric_codes(linear.weight.detach(), 8, None)
        module.weight_int8.copy_(codes)
        module.weight_scale.copy_(scale[:, 0])
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def _prepack(self) -> Any:
        qweight = _per_channel_qweight(self.weight_int8, self.weight_scale)
        return torch.ops.quantized.linear_prepack(qweight, self.bias.float().cpu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # no int8 kernel off CPU here: the same numerics, emulated
            y = F.linear(_dynamic_fake_quant(x), self.dequantized_weight(), self.bias)
            return F.relu(y) if self.relu else y
        if self._packed is None:
            self._packed = self._prepack()
        if self.relu:
            return torch.ops.quantized.linear_relu_dynamic(x, self._packed, True)
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.weight_int8.shape[1],
                "out_features": self.weight_int8.shape[0], "relu": self.relu}


class StaticInt8Linear(DynamicInt8Linear):
    """int8 weights and int8 activations with ranges fixed by calibration (no per-batch range).

    Input and output scales/zero points come from the calibrate stage's activation table.
    """

    kind = "static_int8_linear"

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, relu=False)
        self.register_buffer("act_qparams", torch.tensor([1.0, 0.0, 1.0, 0.0]))  # in s,z; out s,z

    @classmethod
    def from_float_calibrated(cls, linear: nn.Linear, in_range: tuple[float, float],
                              out_range: tuple[float, float]) -> StaticInt8Linear:
        module = cls(linear.in_features, linear.out_features)
        base = DynamicInt8Linear.from_float(linear)
        module.load_state_dict(base.state_dict(), strict=False)
        module.act_qparams.copy_(torch.tensor([*_qparams(*in_range, INPUT_QMAX),
                                               *_qparams(*out_range, 255)]))
        return module

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.weight_int8.shape[1],
                "out_features": self.weight_int8.shape[0]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_s, in_z, out_s, out_z = self.act_qparams.tolist()
        # the calibrated range's codes only (0..INPUT_QMAX): values beyond it saturate here,
        # not inside the kernel's 16-bit pair sums
        x = x.clamp(-in_z * in_s, (INPUT_QMAX - in_z) * in_s)
        if x.device.type != "cpu":  # same numerics, emulated
            xq = torch.fake_quantize_per_tensor_affine(x, in_s, int(in_z), 0, INPUT_QMAX)
            y = F.linear(xq, self.dequantized_weight(), self.bias)
            return torch.fake_quantize_per_tensor_affine(y, out_s, int(out_z), 0, 255)
        if self._packed is None:
            self._packed = self._prepack()
        xq = torch.quantize_per_tensor(x, in_s, int(in_z), torch.quint8)
        return torch.ops.quantized.linear(xq, self._packed, out_s, int(out_z)).dequantize()


# fbgemm's AVX2 int8 GEMM adds pairs of uint8 x int8 products in saturating int16: inputs coded
# over 0..255 overflow there (255 * 127 * 2 > 32767) and the result depends on the CPU (VNNI
# has no such step). Inputs are coded over 0..127, as torch's own fbgemm observers do
# (reduce_range), so that every CPU, and the serving export, computes the same numbers.
INPUT_QMAX = 127


def _qparams(lo: float, hi: float, qmax: int) -> tuple[float, float]:
    """uint8 scale and zero point for [lo, hi] over codes 0..qmax, widened to contain 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / qmax, 1e-8)
    return scale, float(min(qmax, max(0, round(-lo / scale))))


class WeightOnlyLinear(nn.Module):
    """int8 or int4 weights (per output channel, or per group of input columns), fp32
    activations; the weight is dequantized per batch. int4 stores two codes per byte."""

    kind = "weight_only_linear"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int) -> None:
        super().__init__()
        if bits not in (8, 4):
            raise ValueError(f"weight-only bits must be 8 or 4 (got {bits})")
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide width {in_features}")
        self.bits, self.in_features, self.group_size = bits, in_features, group_size
        width = in_features if bits == 8 else (in_features + 1) // 2
        dtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("codes", torch.zeros(out_features, width, dtype=dtype))
        self.register_buffer("scale", torch.ones(out_features, in_features // group_size))
        self.register_buffer("bias", torch.zeros(out_features))

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int,
                   group_size: int | None) -> WeightOnlyLinear:
        g = group_size or linear.in_features
        module = cls(linear.in_features, linear.out_features, bits, g)
        codes, scale = symmetric_codes(linear.weight.detach(), bits, g)
        if bits == 4:
            unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)  # [-7, 7] -> [1, 15]
            if linear.in_features % 2:  # odd width: pad one zero code to fill the last byte
                unsigned = torch.cat([unsigned, torch.full_like(unsigned[:, :1], 8)], dim=1)
            module.codes.copy_(pack(unsigned, 4))
        else:
            module.codes.copy_(codes)
        module.scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def dequantized_weight(self) -> torch.Tensor:
        codes = (unpack(self.codes, 4, self.in_features).to(torch.int8) - 8
                 if self.bits == 4 else self.codes)
        return symmetric_dequant(codes, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.device), self.bias)

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features,
                "out_features": self.codes.shape[0], "bits": self.bits,
                "group_size": self.group_size}


class HalfLinear(nn.Module):
    """fp16 or bf16 stored weights; computed in fp32 on CPU (widened per batch)."""

    kind = "half_linear"

    def __init__(self, in_features: int, out_features: int, dtype: str) -> None:
        super().__init__()
        self.dtype_name = dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features,
                                                   dtype=HALF_DTYPES[dtype]))
        self.register_buffer("bias", torch.zeros(out_features, dtype=HALF_DTYPES[dtype]))

    @classmethod
    def from_float(cls, linear: nn.Linear, dtype: str) -> HalfLinear:
        module = cls(linear.in_features, linear.out_features, dtype)
        module.weight.copy_(linear.weight.detach())
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.weight.shape[1],
                "out_features": self.weight.shape[0], "dtype": self.dtype_name}


class FusedAway(nn.Identity):
    """Marks an activation whose work moved into the preceding layer's fused kernel."""

    kind = "fused_away"

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind}


def fuse_relu(model: nn.Module) -> int:
    """Fold each ReLU that follows a DynamicInt8Linear in a Sequential into its kernel."""
    fused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            layer, act = seq[i], seq[i + 1]
            if type(layer) is DynamicInt8Linear and isinstance(act, nn.ReLU):
                layer.relu = True
                seq[i + 1] = FusedAway()
                fused += 1
    return fused
