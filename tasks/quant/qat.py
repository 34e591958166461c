"""Quantization-aware fine-tuning: fake quantization with a straight-through estimator.

While the quantize stage fine-tunes (`QuantizeConfig.finetune_epochs`), every table and Linear
layer that will be quantized computes its forward pass on the values it will have once
quantized, and its gradient as if rounding were the identity (STE: ``x + (q(x) - x).detach()``).
The float weights learn to sit where rounding costs the least; afterwards the hooks are removed
and the one-shot conversion (`tasks.stages.quantize`) packs the fine-tuned float weights.

- Row-wise tables (int8/int4/int2): each gathered row is fake-quantized with its own range
  (min/max, or the MSE clip of `QuantizeConfig.row_range`), as the table's row would be (a row's
  codes depend on that row only, so quantizing the rows a batch looks up is exact and costs the
  batch, not the table). Sub-byte tables carry fp16 scale and offset, as the packed layout does.
- Weight-only Linear (int8/int4, per channel or per group): the weight is fake-quantized
  symmetrically, as `WeightOnlyLinear.from_float` stores it.
- dynamic int8 Linear: the weight per channel, and the input per batch (per-tensor affine), as
  the dynamic kernel quantizes it.
- Tiered tables: each looked-up row at its tier's bits (head rows at the head dtype).
- fp16 / bf16: a round trip through the half type.
- TT tables: every core, symmetric per (row digit, input rank) slice, as `QuantTTEmbedding`
  stores it (int8 rows -> int8 cores, int4 / int2 -> int4)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from tasks.modules.tt import TTEmbedding
from tasks.quant.primitives import mse_row_ranges, qmax
from tasks.quant.schemes import EMBEDDING, LINEAR


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


def fake_rows(x: torch.Tensor, bits: int, row_range: str = "minmax") -> torch.Tensor:
    """Row-wise affine fake quantization of the last dimension, with each row's range as the
    packed table computes it: min/max, or (``mse``, sub-byte) the clip minimising the row's
    squared error (the range is not differentiated: straight through)."""
    if row_range == "mse" and bits < 8:
        with torch.no_grad():
            flat = x.detach().reshape(-1, x.shape[-1])
            lo, hi = mse_row_ranges(flat, bits)
            lo, hi = lo.reshape(*x.shape[:-1], 1), hi.reshape(*x.shape[:-1], 1)
    else:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / qmax(bits)).clamp_min(1e-8)
    if bits < 8:  # the packed layout stores scale and offset in fp16
        scale, lo = scale.half().float(), lo.half().float()
    q = torch.round((x - lo) / scale).clamp(0, qmax(bits)) * scale + lo
    return _ste(x, q)


def fake_symmetric(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Symmetric fake quantization of a Linear weight [out, in], per channel or per group."""
    out_f, in_f = w.shape
    g = group_size if group_size and in_f > group_size and in_f % group_size == 0 else in_f
    grouped = w.reshape(out_f, in_f // g, g)
    limit = 2 ** (bits - 1) - 1
    scale = (grouped.abs().amax(dim=-1, keepdim=True) / limit).clamp_min(1e-12)
    q = (torch.round(grouped / scale).clamp(-limit, limit) * scale).reshape(out_f, in_f)
    return _ste(w, q)


def fake_tensor_affine(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-tensor affine fake quantization (a dynamic kernel's activation, per batch)."""
    lo, hi = x.detach().amin().clamp(max=0), x.detach().amax().clamp(min=0)
    scale = ((hi - lo) / qmax(bits)).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    q = (torch.round(x / scale) + zero).clamp(0, qmax(bits))
    return _ste(x, (q - zero) * scale)


def _fake_half(x: torch.Tensor, half: str) -> torch.Tensor:
    return _ste(x, x.to(torch.float16 if half == "fp16" else torch.bfloat16).float())


def _core_fn(bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fake quantization of a TT core [n, r_in, d, r_out], one scale per (n, r_in) slice."""
    def fn(core: torch.Tensor) -> torch.Tensor:
        flat = core.reshape(core.shape[0] * core.shape[1], -1)
        return fake_symmetric(flat, bits, None).reshape(core.shape)
    return fn


class _WeightFakeQuant(nn.Module):
    """A parametrization of a Linear's weight: what the weight will be once quantized."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.fn(w)


def _embedding_hook(choice: str, row_range: str, head: torch.Tensor | None = None,
                    ) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
    scheme = EMBEDDING[choice]
    head_bits = scheme.head_bits
    if head_bits is not None:  # tiered: each looked-up row at the bits its tier stores it in
        if head is None:
            raise ValueError(f"fake quantization of a {choice} table needs its head ids")

        def tiered(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            is_head = torch.zeros(module.weight.shape[0], dtype=torch.bool,
                                  device=out.device)
            is_head[head.to(out.device)] = True
            mask = is_head[args[0]].reshape(-1)
            rows = out.reshape(-1, out.shape[-1])
            # each row through its own tier only (the MSE range search is the cost)
            fake = rows.clone()
            fake[mask] = fake_rows(rows[mask], head_bits, row_range)
            fake[~mask] = fake_rows(rows[~mask], scheme.bits, row_range)
            return fake.reshape(out.shape)
        return tiered

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return _fake_half(out, scheme.half) if scheme.half else \
            fake_rows(out, scheme.bits, row_range)
    return hook


def _prepare_linear(layer: nn.Linear, choice: str, group_size: int | None,
                    handles: list[Any]) -> None:
    scheme = LINEAR[choice]
    if scheme.half:
        half = scheme.half
        fn: Callable[[torch.Tensor], torch.Tensor] = lambda w: _fake_half(w, half)  # noqa: E731
    else:
        bits, group = scheme.bits, group_size if scheme.group_wise else None
        fn = lambda w: fake_symmetric(w, bits, group)  # noqa: E731
    parametrize.register_parametrization(layer, "weight", _WeightFakeQuant(fn))
    if choice in ("dynamic_int8", "static_int8"):  # the kernel also quantizes the input
        handles.append(layer.register_forward_pre_hook(
            lambda m, args: (fake_tensor_affine(args[0]), *args[1:])))


@contextmanager
def fake_quantized(model: nn.Module, choices: dict[str, str], group_size: int | None = None,
                   row_range: str = "minmax", heads: dict[str, torch.Tensor] | None = None):
    """`model` with every module path of `choices` (a table or a Linear -> its scheme name)
    fake-quantized while the context is open; the float weights stay the trainable parameters,
    and on exit the model is plain float again (with the fine-tuned weights). `heads`: the
    head ids of each tiered table (tasks.quant.tiers).

    Example:
        >>> with fake_quantized(model, {"embeddings.0": "rowwise_int4", "top.0": "int8_weight_only"}):
        ...     train(model, ...)
        >>> small = quantize(model, cfg, ctx)  # packs the fine-tuned weights
    """
    handles: list[Any] = []
    parametrized: list[nn.Linear] = []
    tt_lists: list[nn.ParameterList] = []
    try:
        for path, module in model.named_modules():
            choice = choices.get(path, "none")
            if choice == "none":
                continue
            if isinstance(module, nn.Embedding):
                handles.append(module.register_forward_hook(
                    _embedding_hook(choice, row_range, (heads or {}).get(path))))
            elif isinstance(module, TTEmbedding):
                bits = 8 if EMBEDDING[choice].bits == 8 else 4 if EMBEDDING[choice].bits in (4, 2) \
                    else None
                if bits is not None:  # the cores, per slice, as QuantTTEmbedding stores them
                    for k in range(len(module.cores)):
                        parametrize.register_parametrization(
                            module.cores, str(k), _WeightFakeQuant(_core_fn(bits)))
                    tt_lists.append(module.cores)
            elif isinstance(module, nn.Linear):
                _prepare_linear(module, choice, group_size, handles)
                parametrized.append(module)
        yield model
    finally:
        for h in handles:
            h.remove()
        for layer in parametrized:  # keep the float weight (not its fake-quantized view)
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        for cores in tt_lists:
            for k in range(len(cores)):
                parametrize.remove_parametrizations(cores, str(k), leave_parametrized=False)
