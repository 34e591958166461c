"""factorize: truncated SVD of Linear layers, low-rank and tensor-train embedding tables."""

from __future__ import annotations

import copy

from torch import nn

from tasks.modules import (
    LowRankEmbedding,
    LowRankLinear,
    TTEmbedding,
    energy_rank,
    set_submodule,
)
from tasks.stages.context import StageContext
from tasks.stages.finetune import finetune
from tasks.types import FactorizeConfig


def factorize(model: nn.Module, cfg: FactorizeConfig, ctx: StageContext) -> nn.Module:
    """Return a factorized (and fine-tuned) copy of `model`. A layer whose rank would not
    save parameters is left as it is."""
    out = copy.deepcopy(model).cpu()
    changed = 0
    for path, m in list(out.named_modules()):
        if cfg.target == "linear" and isinstance(m, nn.Linear) and type(m) in (nn.Linear,):
            rank = cfg.rank or energy_rank(m.weight, cfg.energy)
            rank = min(rank, min(m.weight.shape))
            if rank * (m.in_features + m.out_features) < m.in_features * m.out_features:
                set_submodule(out, path, LowRankLinear.from_linear(m, rank))
                changed += 1
        elif cfg.target == "embeddings" and type(m) is nn.Embedding:
            rows, dim = m.weight.shape
            rank = min(cfg.rank or energy_rank(m.weight, cfg.energy), dim)
            if rank * (rows + dim) < rows * dim:
                set_submodule(out, path, LowRankEmbedding.from_table(m, rank))
                changed += 1
        elif cfg.target == "tt_embeddings" and type(m) is nn.Embedding:
            tt = TTEmbedding.from_table(m, cfg.rank, cfg.energy if cfg.rank is None else 1.0,
                                        cfg.tt_cores)
            if sum(c.numel() for c in tt.cores) < m.weight.numel():
                set_submodule(out, path, tt)
                changed += 1
    if changed == 0:
        raise ValueError(f"{cfg.label()}: no layer gets smaller at this rank; lower the rank "
                         "or the energy")
    ctx.log(f"{cfg.label()}: factorized {changed} layers")
    return finetune(out.to(ctx.device), model, cfg.finetune_epochs, cfg.finetune_lr, ctx,
                    cfg.finetune_target, cfg.finetune_scope).cpu()
