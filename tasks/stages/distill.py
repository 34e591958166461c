"""distill: a smaller student trained on the teacher's probabilities (and the clicks)."""

from __future__ import annotations

import numpy as np
from torch import nn

from tasks.data import Arrays
from tasks.evaluate import predict, stored_elements
from tasks.models import build
from tasks.stages.context import StageContext
from tasks.train import train
from tasks.types import DistillConfig, ModelSpec, TrainConfig


def distill(model: nn.Module, cfg: DistillConfig, ctx: StageContext) -> nn.Module:
    """Return a student trained to match `model` (the teacher). The student's spec is on its
    `spec` attribute, so the artifact records the new architecture."""
    teacher_spec = ctx.need("spec")
    assert isinstance(teacher_spec, ModelSpec)
    spec = cfg.student.model_copy(update={"tables": teacher_spec.tables,
                                          "num_dense": teacher_spec.num_dense})
    student = build(spec, ctx.seed)
    n_student, n_teacher = stored_elements(student), stored_elements(model)
    if cfg.require_smaller and n_student >= n_teacher:
        raise ValueError(
            f"distill.student has {n_student} stored elements, not fewer than the teacher's "
            f"{n_teacher}; shrink student.embedding_dim or its MLP widths, or set "
            "require_smaller=false")
    data = ctx.need("train_data")
    assert isinstance(data, Arrays)
    soft = predict(model, data)
    target = (cfg.alpha * soft + (1 - cfg.alpha) * data.label).astype(np.float32)
    valid = ctx.calibration() if ctx.calibration else None
    student = train(student, Arrays(data.dense, data.sparse, target),
                    TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                seed=ctx.seed), ctx.device,
                    valid=valid)
    ctx.log(f"{cfg.label()}: student {n_student} vs teacher {n_teacher} stored elements")
    return student.cpu()
