"""Stage registry: the config's type selects the function (no string dispatch)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tasks.modules import with_pooled_tables
from tasks.stages.calibrate import Calibration, calibrate
from tasks.stages.context import StageContext
from tasks.stages.distill import distill, nas_trial
from tasks.stages.factorize import factorize
from tasks.stages.prune import prune
from tasks.stages.quantize import quantize
from tasks.types import (
    DistillConfig,
    FactorizeConfig,
    NASTrialConfig,
    PruneConfig,
    QuantizeConfig,
    StageConfig,
)

STAGES: dict[type, Callable[..., nn.Module]] = {
    QuantizeConfig: quantize, PruneConfig: prune, FactorizeConfig: factorize,
    DistillConfig: distill, NASTrialConfig: nas_trial,
}


def apply_stage(model: nn.Module, cfg: StageConfig, ctx: StageContext) -> nn.Module:
    """`cfg`'s stage applied to `model` (left as it is). `nn.EmbeddingBag` tables are first
    seen as lookup tables plus pooling (`tasks.modules.bag`), so every stage that compresses
    tables compresses bags the same way."""
    try:
        fn = STAGES[type(cfg)]
    except KeyError:
        raise ValueError(f"no stage registered for config {type(cfg).__name__}") from None
    return fn(with_pooled_tables(model), cfg, ctx)



__all__ = ["STAGES", "Calibration", "StageContext", "apply_stage", "calibrate", "distill",
           "factorize", "nas_trial", "prune", "quantize"]
