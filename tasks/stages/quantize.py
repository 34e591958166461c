"""quantize: post-training quantization of Linear layers and embedding tables."""

from __future__ import annotations

import copy

from torch import nn

from tasks.modules import DynamicInt8Linear, RowWiseInt8Embedding, set_submodule
from tasks.stages.context import StageContext
from tasks.types import QuantizeConfig


def quantize(model: nn.Module, cfg: QuantizeConfig, ctx: StageContext) -> nn.Module:
    """Return a quantized copy of `model` (the input is left untouched).

    Example:
        >>> small = quantize(model, QuantizeConfig(linear="dynamic_int8"), ctx)
    """
    out = copy.deepcopy(model).cpu()
    for path, module in list(out.named_modules()):
        if cfg.embeddings == "rowwise_int8" and isinstance(module, nn.Embedding):
            set_submodule(out, path, RowWiseInt8Embedding.from_float(module.weight))
        elif cfg.linear == "dynamic_int8" and isinstance(module, nn.Linear):
            set_submodule(out, path, DynamicInt8Linear.from_float(module))
    ctx.log(f"{cfg.label()}: done")
    return out
