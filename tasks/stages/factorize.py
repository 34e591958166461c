"""factorize: truncated SVD of Linear layers, low-rank and tensor-train embedding tables."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from tasks.determinism import THREADS, fixed_threads
from tasks.modules import (
    LowRankEmbedding,
    LowRankLinear,
    TTEmbedding,
    energy_rank,
    set_submodule,
)
from tasks.modules.tt import full_ranks, tt_shape
from tasks.stages.context import NotApplicable, StageContext
from tasks.stages.finetune import finetune
from tasks.types import FactorizeConfig


def _low_rank_budget(a: int, b: int, budget: float) -> int:
    """Largest rank r with r * (a + b) <= budget * a * b (0: even rank 1 is over)."""
    return int(budget * a * b // (a + b))


def _budget_rank(cost: Callable[[int], int], full: int, budget: float) -> int:
    """Largest rank in [1, full] whose parameter count `cost(rank)` is within `budget` (0:
    none is)."""
    fits = [r for r in range(1, full + 1) if cost(r) <= budget]
    return fits[-1] if fits else 0


def _tt_params(table: nn.Embedding, cap: int, k: int) -> int:
    rows, dim = table.weight.shape
    ns, ds = tt_shape(rows, dim, k)
    r = [1, *(min(cap, f) for f in full_ranks(ns, ds)), 1]
    return sum(r[i] * n * d * r[i + 1] for i, (n, d) in enumerate(zip(ns, ds)))


def _factorize_layers(out: nn.Module, cfg: FactorizeConfig) -> int:
    """Replace the target layers of `out` in place; returns how many changed."""
    budget = cfg.param_budget
    changed = 0
    for path, m in list(out.named_modules()):
        if cfg.target == "linear" and type(m) is nn.Linear:
            n_in, n_out = m.in_features, m.out_features
            rank = cfg.rank or (_low_rank_budget(n_in, n_out, budget) if budget
                                else energy_rank(m.weight, cfg.energy))
            rank = min(rank, min(m.weight.shape))
            if rank > 0 and rank * (n_in + n_out) < n_in * n_out:
                set_submodule(out, path, LowRankLinear.from_linear(m, rank))
                changed += 1
        elif cfg.target == "embeddings" and type(m) is nn.Embedding:
            rows, dim = m.weight.shape
            rank = cfg.rank or (_low_rank_budget(rows, dim, budget) if budget
                                else energy_rank(m.weight, cfg.energy))
            rank = min(rank, dim)
            if rank > 0 and rank * (rows + dim) < rows * dim:
                set_submodule(out, path, LowRankEmbedding.from_table(m, rank))
                changed += 1
        elif cfg.target == "tt_embeddings" and type(m) is nn.Embedding:
            cap = cfg.rank
            if budget:
                cap = _budget_rank(lambda r: _tt_params(m, r, cfg.tt_cores),  # noqa: B023
                                   max(full_ranks(*tt_shape(*m.weight.shape, cfg.tt_cores))),
                                   budget * m.weight.numel())
                if cap == 0:
                    continue
            tt = TTEmbedding.from_table(m, cap, cfg.energy if cap is None else 1.0, cfg.tt_cores)
            if sum(c.numel() for c in tt.cores) < m.weight.numel():
                set_submodule(out, path, tt)
                changed += 1
    return changed


def factorize(model: nn.Module, cfg: FactorizeConfig, ctx: StageContext) -> nn.Module:
    """Return a factorized (and fine-tuned) copy of `model`. A layer whose rank would not
    save parameters is left as it is."""
    out = copy.deepcopy(model).cpu()
    with fixed_threads(THREADS):  # MKL's SVD gives other bits on another thread count
        changed = _factorize_layers(out, cfg)
    if changed == 0:
        raise NotApplicable(f"{cfg.label()}: no layer gets smaller at this rank; lower the rank "
                         "or the energy")
    ctx.log(f"{cfg.label()}: factorized {changed} layers")
    return finetune(out.to(ctx.device), model, cfg.finetune_epochs, cfg.finetune_lr, ctx,
                    cfg.finetune_target, cfg.finetune_scope).cpu()
