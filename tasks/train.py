"""The one training loop (baseline; fine-tuning, distillation and NAS reuse it)."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tasks import objectives
from tasks.data import Arrays
from tasks.determinism import reproducible
from tasks.protocol import problem_kind
from tasks.types import ProblemKind, TrainConfig

log = logging.getLogger("recsqueeze.train")

Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(scores of a batch, their targets, the batch's row indices into the training arrays) ->
scalar loss; scores and targets as `tasks.objectives.train_scores` gives them."""



def train(model: nn.Module, data: Arrays, cfg: TrainConfig,
          device: torch.device | None = None, valid: Arrays | None = None,
          normalize: bool = True, objective: Objective | None = None,
          extra_params: Sequence[nn.Parameter] = (), max_steps: int | None = None) -> nn.Module:
    """Minimise the problem kind's loss on `data` with Adam (BCE for ranking; softmax over
    in-batch items or the catalogue for retrieval, see tasks.objectives).

    Reproducible: the same inputs and `cfg.seed` give bit-identical weights whatever the
    process's intra-op thread count (`tasks.determinism.reproducible`: threads fixed, torch's
    deterministic algorithms, a seeded RNG for dropout; every process-wide setting and the
    caller's RNG state are restored afterwards). Data order comes from a generator of its own.

    With `valid`, training stops once `cfg.patience` epochs in a row have not improved the
    validation loss and returns the best epoch's weights: models with large id embeddings
    overfit after about one pass, while a small data set may need many; patience lets more
    epochs help where they can.
    `normalize=False` keeps what the model took from the train split (fine-tuning).
    `objective` replaces BCE on `data.label` (distillation); `extra_params` are trained along
    (e.g. a hint loss's projection) but are not part of the model. `max_steps` ends training
    after that many batches (a NAS trial's budget); the valid split is checked then too.
    With `valid`, a fine-tuning run that does not beat the starting weights returns them.
    """
    device = device or torch.device("cpu")
    with reproducible(cfg.seed, device):
        return _fit(model, problem_kind(model), data, cfg, device, valid, normalize, objective,
                    extra_params, max_steps)


def _fit(model: nn.Module, kind: ProblemKind, data: Arrays, cfg: TrainConfig,
         device: torch.device, valid: Arrays | None, normalize: bool,
         objective: Objective | None, extra_params: Sequence[nn.Parameter],
         max_steps: int | None) -> nn.Module:
    if normalize:
        objectives.prepare(model, data)
    model.to(device).train()
    opt = torch.optim.Adam([*model.parameters(), *extra_params], lr=cfg.lr,
                           weight_decay=cfg.weight_decay)
    dense = torch.from_numpy(data.dense)
    sparse = torch.from_numpy(data.sparse)
    label = torch.from_numpy(data.label)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    best_score, best_state = float("inf"), None
    if valid is not None and not normalize:  # fine-tuning: the start is a candidate too
        best_score = objectives.valid_loss(model, kind, valid, device)
        best_state = copy.deepcopy(model.state_dict())
    done, best_epoch = 0, -1
    batch_size = cfg.rows_per_step(len(data))
    lookups = _LookupL2(model) if cfg.embedding_l2 > 0 else None
    for epoch in range(cfg.passes(len(data))):
        if max_steps is not None and done >= max_steps:
            break
        order = torch.randperm(len(data), generator=gen)
        total, steps = 0.0, 0
        for i in range(0, len(order), batch_size):
            if max_steps is not None and done >= max_steps:
                break
            done += 1
            idx = order[i:i + batch_size]
            scores, targets = objectives.train_scores(
                model, kind, dense[idx].to(device), sparse[idx].to(device), label[idx].to(device))
            loss = objective(scores, targets, idx) if objective is not None else \
                objectives.target_loss(kind, scores, targets)
            if lookups is not None:
                loss = loss + cfg.embedding_l2 * lookups.take(len(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
        log.info("epoch %d: train loss %.4f (%.1fs)", epoch + 1, total / max(steps, 1),
                 time.perf_counter() - start)
        if valid is None:
            continue
        score = objectives.valid_loss(model, kind, valid, device)
        if score < best_score:
            best_score, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
            continue
        if epoch - best_epoch >= cfg.patience:
            log.info("epoch %d: valid loss %.5f, no better than %.5f (epoch %d) for %d epochs: "
                     "stopping, keeping epoch %d", epoch + 1, score, best_score, best_epoch + 1,
                     cfg.patience, best_epoch + 1)
            break
    if lookups is not None:
        lookups.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    objectives.finish(model)
    return model.eval()


class _LookupL2:
    """The squared norms of the vectors the model's `nn.Embedding` / `nn.EmbeddingBag` tables
    returned since the last `take`, summed (forward hooks; lookups without grad, such as
    validation, are not counted)."""

    def __init__(self, model: nn.Module) -> None:
        self.total: torch.Tensor | None = None
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, nn.Embedding | nn.EmbeddingBag)]

    def _hook(self, module: nn.Module, args: object, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            norms = output.pow(2).sum()
            self.total = norms if self.total is None else self.total + norms

    def take(self, rows: int) -> torch.Tensor | float:
        """The batch's sum over its `rows` rows, per row; the sum starts again."""
        total, self.total = self.total, None
        return total / rows if total is not None else 0.0

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
