"""Fine-tuning after a structural change, with the one training loop."""

from __future__ import annotations

import torch
from torch import nn

from tasks.data import Arrays
from tasks.objectives import soft_loss, train_scores
from tasks.protocol import problem_kind
from tasks.stages.context import StageContext
from tasks.train import train
from tasks.types import TrainConfig

FINETUNE_BATCH = 2048  # rows per step of every fine-tuning pass (prune, factorize, QAT)


def finetune(model: nn.Module, teacher: nn.Module, epochs: int, lr: float, ctx: StageContext,
             target: str = "teacher", scope: str = "all") -> nn.Module:
    """`epochs` passes over the train split (none when 0); the best of the start and each
    epoch on the valid split is kept.

    `target="teacher"` fits the compressed model to the uncompressed model's click
    probabilities on the train rows (soft labels) instead of the clicks: a second pass over
    rows the model has already seen overfits the labels, not the teacher (measured on `small`,
    structured 50% pruning: test AUC 0.7115 before fine-tuning, 0.6757 after one epoch on
    labels, 0.7161 after one epoch on the teacher; the baseline has 0.7162).
    For retrieval models the teacher's softmax over the same items (the batch's, or the
    catalogue) is the target. `scope="dense"` leaves embedding tables frozen.
    """
    if epochs == 0:
        return model
    data = ctx.need("train_data")
    assert isinstance(data, Arrays)
    kind = problem_kind(model)
    objective = None
    if target == "teacher" and kind == "ranking":
        soft = torch.sigmoid(torch.from_numpy(ctx.input_logits(teacher))).numpy()
        data = data.with_label(soft)
    elif target == "teacher":  # retrieval: match the teacher's softmax over the same items
        dense, sparse, label = (torch.from_numpy(a) for a in (data.dense, data.sparse,
                                                              data.label))
        teacher.eval()

        def objective(out: torch.Tensor, targets: torch.Tensor,
                      idx: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t, _ = train_scores(teacher, kind, dense[idx], sparse[idx], label[idx],
                                    items_of=model)
            return soft_loss(kind, out, t.to(out.device), 1.0)
    valid = ctx.calibration() if ctx.calibration else None
    frozen = [p for m in model.modules() if isinstance(m, nn.Embedding)
              for p in m.parameters(recurse=False)] if scope == "dense" else []
    for p in frozen:
        p.requires_grad_(False)
    try:
        cfg = TrainConfig(epochs=epochs, lr=lr, seed=ctx.seed, batch_size=FINETUNE_BATCH)
        return train(model, data, cfg, ctx.device, valid=valid, normalize=False,
                     objective=objective)
    finally:
        for p in frozen:
            p.requires_grad_(True)
