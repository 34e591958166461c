"""quantize: post-training quantization of Linear layers and embedding tables."""

from __future__ import annotations

import copy

import pyarrow as pa
import torch
from torch import nn

from tasks.modules import QuantTTEmbedding, TTEmbedding, fuse_relu, set_submodule
from tasks.quant.mixed import Option, assign
from tasks.quant.qat import fake_quantized
from tasks.quant.schemes import (
    EMBEDDING,
    LINEAR,
    BuildArgs,
    Range,
    embedding_scheme,
    linear_scheme,
)
from tasks.quant.tiers import heads_of
from tasks.stages.context import NotApplicable, StageContext
from tasks.stages.finetune import finetune
from tasks.types import QuantizeConfig


def quantize_embedding(table: nn.Embedding, choice: str, row_range: str = "mse",
                       head: torch.Tensor | None = None, path: str = "") -> nn.Module:
    """`table` as the embedding scheme `choice` builds it (the table itself for "none");
    `head`: a tiered scheme's head ids (tasks.quant.tiers)."""
    scheme = embedding_scheme(choice)
    return scheme.build(table, scheme, BuildArgs(path, row_range=row_range, head=head))


def quantize_linear(layer: nn.Linear, choice: str, group_size: int | None = None,
                    act_range: tuple[Range, Range] | None = None,
                    path: str = "") -> nn.Module:
    """`layer` as the Linear scheme `choice` builds it (the layer itself for "none")."""
    scheme = linear_scheme(choice)
    if not scheme.group_wise:
        group_size = None
    if group_size is not None and layer.in_features <= group_size:
        group_size = None  # a row narrower than a group is one group: per channel
    if group_size is not None and layer.in_features % group_size:
        raise NotApplicable(f"quantize.group_size {group_size} does not divide the width "
                         f"{layer.in_features} of layer {path}; pick a divisor")
    return scheme.build(layer, scheme, BuildArgs(path, group_size, act_range=act_range))


def _act_ranges(table: pa.Table, method: str) -> dict[str, tuple[float, float]]:
    """(module path, 'input'|'output') -> range, from the calibrate stage's table."""
    cols = {"minmax": ("min", "max"), "percentile": ("p_lo", "p_hi"),
            "mse": ("mse_lo", "mse_hi"), "entropy": ("kl_lo", "kl_hi")}[method]
    rows = table.select(["module", "tensor", *cols]).to_pylist()
    return {f"{r['module']}:{r['tensor']}": (r[cols[0]], r[cols[1]]) for r in rows}


def mixed_plan(cfg: QuantizeConfig, ctx: StageContext) -> dict[str, str]:
    """Layer path -> dtype, cheapest within budget_fraction of the run's relative budget
    on the main metric."""
    assert cfg.mixed_precision is not None
    mp = cfg.mixed_precision
    table = ctx.need("sensitivity")
    budget = ctx.max_relative_loss
    if budget is None:
        raise ValueError("mixed precision needs the run's budget on the main metric "
                         "(ctx.max_relative_loss)")
    allowed = set(mp.embedding_choices) | set(mp.linear_choices)
    options: dict[str, list[Option]] = {}
    for r in table.to_pylist():  # type: ignore[attr-defined]
        if r["choice"] in allowed:
            options.setdefault(r["module"], []).append(
                Option(r["choice"], int(r["bytes"]), max(0.0, float(r["relative_loss"]))))
    plan = assign(options, budget * mp.budget_fraction)
    ctx.log("mixed precision: " + ", ".join(f"{k}={v}" for k, v in sorted(plan.items())))
    return plan


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def tt_core_bits(choice: str) -> int | None:
    """The bits a TT table's cores get for the table dtype `choice`: int8 rows -> int8 cores,
    int4 / int2 rows -> int4 cores (per-slice scales; 2-bit cores lose too much); None keeps
    them float."""
    if EMBEDDING[choice].head_bits is not None:
        raise NotApplicable(f"quantize: {choice} tiers the rows of a dense table; a TT table "
                            "has no rows to tier (use rowwise_int8/int4 for its cores)")
    bits = EMBEDDING[choice].bits
    return 8 if bits == 8 else 4 if bits in (4, 2) else None


def _choices(model: nn.Module, cfg: QuantizeConfig, plan: dict[str, str] | None) -> dict[str, str]:
    """Module path -> the scheme each table and Linear layer gets."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.Embedding, TTEmbedding)):
            out[path] = plan.get(path, "none") if plan is not None else \
                cfg.layers.get(path, cfg.embeddings)
            schemes = EMBEDDING
        elif isinstance(module, nn.Linear):
            out[path] = plan.get(path, "none") if plan is not None else \
                cfg.layers.get(path, cfg.linear)
            schemes = LINEAR
        else:
            continue
        if out[path] not in schemes:
            kind = "table" if schemes is EMBEDDING else "Linear layer"
            raise NotApplicable(f"quantize.layers[{path!r}]: {out[path]!r} is not a dtype of a "
                                f"{kind} (one of {list(schemes)})")
    unknown = sorted(set(cfg.layers) - set(out))
    if unknown:
        raise NotApplicable(f"quantize.layers: {unknown} name no table or Linear layer of this "
                            f"model (its tables and layers: {sorted(out)})")
    return out


def quantize(model: nn.Module, cfg: QuantizeConfig, ctx: StageContext) -> nn.Module:
    """Return a quantized copy of `model` (the input is left untouched). With
    `cfg.finetune_epochs`, the copy is first fine-tuned with fake quantization (straight-through
    estimator, tasks.quant.qat) to fit `model`'s outputs, then converted.

    Example:
        >>> small = quantize(model, QuantizeConfig(embeddings="rowwise_int4"), ctx)
    """
    out = copy.deepcopy(model).cpu()
    plan = mixed_plan(cfg, ctx) if cfg.mixed_precision is not None else None
    ranges = _act_ranges(ctx.need("activations"), cfg.activation_range) \
        if plan is None and linear_scheme(cfg.linear).needs_ranges else {}
    choices = _choices(out, cfg, plan)
    tiered = [p for p, c in choices.items()
              if EMBEDDING.get(c) and EMBEDDING[c].head_bits is not None
              and isinstance(out.get_submodule(p), nn.Embedding)]
    # counted on the CPU copy: the conversion below runs on it too
    heads = heads_of(out, tiered, cfg.head_share, ctx.need("train_data")) \
        if tiered else {}  # type: ignore[arg-type]
    for path, ids in heads.items():
        ctx.log(f"{cfg.label()}: {path}: {ids.numel()} head rows at "
                f"{choices[path].split('_')[1]}, the other "
                f"{out.get_submodule(path).weight.shape[0] - ids.numel()} at "
                f"{choices[path].split('_')[2]}")
    if cfg.finetune_epochs:
        with fake_quantized(out.to(ctx.device), choices, cfg.group_size, cfg.row_range, heads):
            out = finetune(out, model, cfg.finetune_epochs, cfg.finetune_lr, ctx)
        out = out.cpu()
        ctx.log(f"{cfg.label()}: {cfg.finetune_epochs} epoch(s) of quantization-aware "
                "fine-tuning")
    kept = []
    for path, module in list(out.named_modules()):
        if isinstance(module, TTEmbedding):
            bits = tt_core_bits(choices[path])
            if bits is not None:
                set_submodule(out, path, QuantTTEmbedding.from_tt(module, bits))
        elif isinstance(module, nn.Embedding):
            small = quantize_embedding(module, choices[path], cfg.row_range, heads.get(path),
                                       path)
            if small is module:  # the scheme keeps the table ("none")
                continue
            if _nbytes(small) >= _nbytes(module):  # e.g. a width-1 table: the row's scale and
                kept.append(path)                  # offset outweigh its one value
                continue
            set_submodule(out, path, small)
        elif isinstance(module, nn.Linear):
            act = (ranges[f"{path}:input"], ranges[f"{path}:output"]) if ranges else None
            set_submodule(out, path, quantize_linear(module, choices[path], cfg.group_size, act,
                                                     path))
    fused = fuse_relu(out)
    ctx.log(f"{cfg.label()}: done ({fused} ReLUs fused into int8 kernels"
            + (f"; left {kept} as they are: not smaller quantized" if kept else "") + ")")
    return out
