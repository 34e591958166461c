"""prune: structured MLP neurons and attention heads, unstructured magnitude (sparse storage),
embedding rows, 2:4 semi-structured (GPU); one shot or gradual (prune -> fine-tune cycles)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from tasks.data import Arrays
from tasks.modules import (
    PrunedEmbedding,
    PrunedLinear,
    SemiSparseLinear,
    SparseLinear,
    semi_structured_ok,
    set_submodule,
)
from tasks.protocol import attention_projections, problem_kind
from tasks.quant.tiers import lookup_counts
from tasks.stages.context import NotApplicable, StageContext, StageSkipped
from tasks.stages.finetune import finetune
from tasks.types import PruneConfig

# element-wise layers: a hidden neuron between two Linear layers is its row and column only
_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Identity, nn.Dropout)


def _attention(model: nn.Module) -> list[nn.Module]:
    """Self-attention modules with whole heads to remove (tasks.protocol.MultiHeadAttention
    whose q/k/v/o are still plain Linear layers)."""
    out = []
    for m in model.modules():
        projections = attention_projections(m)
        if projections is not None and all(type(p) in (nn.Linear, PrunedLinear)
                                           for p in projections.values()):
            out.append(m)
    return out


def prune_heads(model: nn.Module, sparsity: float) -> int:
    """Remove the `sparsity` share of each attention module's heads (at least one stays), the
    ones with the smallest norm of their q/k/v rows times their o columns. Returns how many."""
    removed = 0
    for attn in _attention(model):
        hd = attn.head_dim
        heads = attn.q.out_features // hd
        keep_n = max(1, round(heads * (1 - sparsity)))
        if keep_n == heads:
            continue
        with torch.no_grad():
            rows = [getattr(attn, p).weight.reshape(heads, hd, -1) for p in ("q", "k", "v")]
            score = sum(r.norm(dim=(1, 2)) for r in rows) * \
                attn.o.weight.reshape(attn.o.out_features, heads, hd).norm(dim=(0, 2))
            keep = torch.sort(torch.topk(score, keep_n).indices).values
            idx = (keep[:, None] * hd + torch.arange(hd)).flatten()
            for p in ("q", "k", "v"):
                old = getattr(attn, p)
                new = PrunedLinear(old.in_features, len(idx))
                new.weight.copy_(old.weight[idx])
                new.bias.copy_(old.bias[idx])
                setattr(attn, p, new)
            new_o = PrunedLinear(len(idx), attn.o.out_features)
            new_o.weight.copy_(attn.o.weight[:, idx])
            new_o.bias.copy_(attn.o.bias)
            attn.o = new_o
        removed += heads - keep_n
    return removed


def _hidden_pairs(model: nn.Module) -> list[tuple[nn.Sequential, int, int]]:
    """(sequential, i, j): Linear i feeds Linear j through element-wise layers only, so the
    hidden neurons between them can be removed (the model's input/output widths stay)."""
    pairs = []
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        linears = [k for k, m in enumerate(seq) if isinstance(m, nn.Linear)]
        for i, j in zip(linears, linears[1:]):
            if all(isinstance(seq[k], _ELEMENTWISE) for k in range(i + 1, j)):
                pairs.append((seq, i, j))
    return pairs


def prune_neurons(model: nn.Module, sparsity: float) -> int:
    """Remove the `sparsity` share of hidden neurons with the smallest |in|*|out| weight norm.
    Returns the number of neurons removed. A ReLU neuron is gone when its row and the next
    layer's column are gone: outputs are unchanged for neurons that were already dead."""
    removed = 0
    for seq, i, j in _hidden_pairs(model):
        first, second = seq[i], seq[j]
        score = first.weight.detach().norm(dim=1) * second.weight.detach().norm(dim=0)
        keep_n = max(1, round(first.out_features * (1 - sparsity)))
        keep = torch.sort(torch.topk(score, keep_n).indices).values
        new_first = PrunedLinear(first.in_features, keep_n, bias=first.bias is not None)
        new_second = PrunedLinear(keep_n, second.out_features, bias=second.bias is not None)
        with torch.no_grad():
            new_first.weight.copy_(first.weight[keep])
            if first.bias is not None:
                new_first.bias.copy_(first.bias[keep])
            new_second.weight.copy_(second.weight[:, keep])
            if second.bias is not None:
                new_second.bias.copy_(second.bias)
        seq[i], seq[j] = new_first, new_second
        removed += first.out_features - keep_n
    return removed


def _masked(m: nn.Module) -> bool:
    """Whether torch.nn.utils.prune masks m's own weight (its `weight_mask` buffer)."""
    return "weight_mask" in dict(m.named_buffers(recurse=False))


def _effective(m: nn.Module) -> torch.Tensor:
    """The weight as it stands, on CPU. A masked layer's `weight` attribute is refreshed only by
    a forward pass (it may hold a rejected epoch's values or sit on another device)."""
    if _masked(m):
        return (m.weight_orig * m.weight_mask).detach().cpu()
    return m.weight.detach().cpu()


def prune_magnitude(model: nn.Module, sparsity: float, scope: str, store: bool = True) -> None:
    """Zero the `sparsity` share of Linear weights with the smallest magnitude. `store=True`
    swaps in CSR-stored SparseLinear modules; `store=False` only masks the weights
    (torch.nn.utils.prune), so fine-tuning keeps them at zero and a later call prunes further
    (the cycles of a gradual schedule); `finish_masks` then stores them sparsely."""
    linears = [(p, m) for p, m in model.named_modules() if type(m) in (nn.Linear, PrunedLinear)]
    if scope == "global":
        flat = torch.cat([_effective(m).abs().flatten() for _, m in linears])
        threshold = torch.quantile(flat.float(), sparsity) if flat.numel() < 2**24 else \
            flat.kthvalue(max(1, int(sparsity * flat.numel()))).values
    for path, m in linears:
        w = _effective(m).abs()
        t = threshold if scope == "global" else torch.quantile(w.flatten(), sparsity)
        if store:
            set_submodule(model, path, SparseLinear.from_dense(m, w > t))
        else:  # masks multiply: weights pruned in an earlier cycle stay pruned
            torch_prune.custom_from_mask(m, "weight", w > t)


def finish_masks(model: nn.Module) -> None:
    """Make masked weights permanent and store them sparsely."""
    for path, m in list(model.named_modules()):
        if _masked(m):
            mask = m.weight_mask.bool()
            torch_prune.remove(m, "weight")
            set_submodule(model, path, SparseLinear.from_dense(m, mask))


def prune_semi_structured(model: nn.Module) -> int:
    """2:4 on every Linear whose shape the sparse kernels take; returns how many."""
    done = 0
    for path, m in list(model.named_modules()):
        if type(m) in (nn.Linear, PrunedLinear) and semi_structured_ok(m):
            set_submodule(model, path, SemiSparseLinear.from_linear(m))
            done += 1
    return done


def schedule(sparsity: float, steps: int) -> list[float]:
    """Cumulative sparsity after each cycle: s * (1 - (1 - k/steps)^3), k = 1..steps."""
    return [sparsity * (1 - (1 - k / steps) ** 3) for k in range(1, steps + 1)]


def prune_rows(model: nn.Module, sparsity: float, criterion: str,
               counts: dict[str, torch.Tensor] | None) -> None:
    """Keep the `1 - sparsity` share of each table's rows: the most looked-up ones
    (`counts`: path -> lookups per row) or those of the largest norm."""
    tables = [(p, m) for p, m in model.named_modules() if type(m) is nn.Embedding]
    for path, table in tables:
        rows = table.weight.shape[0]
        keep_n = max(1, round(rows * (1 - sparsity)))
        if criterion == "frequency":
            assert counts is not None
            score = counts[path].double()
        else:
            score = table.weight.detach().norm(dim=1).double()
        keep = torch.sort(torch.topk(score, keep_n).indices).values
        set_submodule(model, path, PrunedEmbedding.from_table(table, keep))


def prune(model: nn.Module, cfg: PruneConfig, ctx: StageContext) -> nn.Module:
    """Return a pruned (and fine-tuned) copy of `model`."""
    if cfg.method == "semi_structured":
        if ctx.device.type != "cuda":
            raise StageSkipped("prune(2:4): semi-structured sparsity needs a CUDA worker "
                               "(sparse tensor cores, compute capability >= 8.0); this one has "
                               "none: set resources.gpus_per_stage on a GPU cluster")
        cap = torch.cuda.get_device_capability(ctx.device)
        if cap < (8, 0):
            raise StageSkipped(f"prune(2:4): the GPU has compute capability {cap}, sparse "
                               "tensor cores need >= 8.0 (Ampere or newer)")
    out = copy.deepcopy(model).cpu()
    if cfg.method == "semi_structured":
        n = prune_semi_structured(out)
        if n == 0:
            raise NotApplicable("prune(2:4): no Linear layer has a shape the sparse kernels take "
                             "(out_features % 32 == 0 and in_features % 64 == 0)")
        ctx.log(f"{cfg.label()}: {n} layers made 2:4 sparse")
    elif cfg.method == "embedding_rows":
        counts = None
        if cfg.criterion == "frequency" and problem_kind(out) != "ranking":
            raise ValueError("prune(embedding_rows): criterion 'frequency' counts the ranking "
                             "inputs' ids; for a retrieval or sequential model use "
                             "criterion 'norm'")
        if cfg.criterion == "frequency":  # each table's lookups, as the model makes them
            data = ctx.need("train_data")
            assert isinstance(data, Arrays)
            counts = lookup_counts(out, [p for p, m in out.named_modules()
                                         if type(m) is nn.Embedding], data, max_rows=len(data))
        prune_rows(out, cfg.sparsity, cfg.criterion, counts)
    else:  # structured / magnitude, one shot or in cycles
        done = 0.0
        for k, target in enumerate(schedule(cfg.sparsity, cfg.steps)):
            last = k == cfg.steps - 1
            if cfg.method == "structured":
                if not _hidden_pairs(out) and not _attention(out):
                    raise NotApplicable("prune(structured): the model has no hidden MLP neurons "
                                     "or attention heads to remove")
                share = 1 - (1 - target) / (1 - done)  # of what is left
                n, h = prune_neurons(out, share), prune_heads(out, share)
                ctx.log(f"{cfg.label()}: cycle {k + 1}: removed {n} neurons, {h} heads")
            else:
                prune_magnitude(out, target, cfg.scope, store=cfg.steps == 1)
            done = target
            if not last:
                out = finetune(out.to(ctx.device), model, cfg.finetune_epochs, cfg.finetune_lr,
                               ctx, cfg.finetune_target, cfg.finetune_scope).cpu()
        finish_masks(out)
    return finetune(out.to(ctx.device), model, cfg.finetune_epochs, cfg.finetune_lr, ctx,
                    cfg.finetune_target, cfg.finetune_scope).cpu()
