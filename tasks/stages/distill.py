"""distill: a smaller student trained to imitate a teacher (soft labels with temperature, hard
labels, a hidden-layer hint with a learned projection, listwise ranking over query groups)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from tasks.data import Arrays
from tasks.evaluate import stored_elements
from tasks.losses import (
    HiddenCapture,
    hard_label_bce,
    hint_loss,
    listwise_loss,
    output_layer,
    soft_label_bce,
)
from tasks.models import build
from tasks.stages.context import StageContext
from tasks.train import train
from tasks.types import DistillConfig, ModelSpec, NASTrialConfig, TrainConfig


def _teacher(model: nn.Module, cfg: DistillConfig, ctx: StageContext) -> tuple[nn.Module, np.ndarray]:
    if cfg.teacher == "input":
        return model, ctx.input_logits(model)
    if ctx.registry_teacher is None:
        raise ValueError(f"distill.teacher={cfg.teacher!r} needs the model registry: run the "
                         "stage inside the compress flow, or use teacher='input'")
    return ctx.registry_teacher(cfg.teacher)


def distill(model: nn.Module, cfg: DistillConfig, ctx: StageContext) -> nn.Module:
    """Return a student trained to imitate the teacher (`model`, or cfg.teacher from the
    registry). The student's spec is on its `spec` attribute, so the artifact records the new
    architecture."""
    input_spec = ctx.need("spec")
    assert isinstance(input_spec, ModelSpec)
    spec = cfg.student.model_copy(update={"tables": input_spec.tables,
                                          "num_dense": input_spec.num_dense})
    student = build(spec, ctx.seed)
    n_student, n_input = stored_elements(student), stored_elements(model)
    if cfg.require_smaller and n_student >= n_input:
        raise ValueError(
            f"distill.student has {n_student} stored elements, not fewer than its input model's "
            f"{n_input}; shrink student.embedding_dim or its MLP widths, or set "
            "require_smaller=false")
    data = ctx.need("train_data")
    assert isinstance(data, Arrays)
    teacher, logits = _teacher(model, cfg, ctx)
    if len(logits) != len(data):
        raise ValueError(f"distill.teacher: {len(logits)} teacher outputs for {len(data)} train "
                         "rows; the teacher was scored on other data")
    groups = None
    if cfg.listwise_weight:
        if ctx.query_column is None:
            raise ValueError("distill.listwise_weight > 0 needs query groups: set the dataset "
                             "spec's query_id column, or set listwise_weight to 0")
        groups = torch.from_numpy(data.sparse[:, ctx.query_column])

    device = ctx.device
    t_logits, labels = torch.from_numpy(logits.astype(np.float32)), torch.from_numpy(data.label)
    dense, sparse = torch.from_numpy(data.dense), torch.from_numpy(data.sparse)
    projection, teacher_out = None, None
    student_out = None
    if cfg.hint_weight:
        probe = dense[:2], sparse[:2]
        teacher.eval()
        teacher_out, teacher_width = output_layer(teacher, *probe)
        student_out, student_width = output_layer(student, *probe)
        projection = nn.Linear(student_width, teacher_width, bias=False).to(device)
    temperature = cfg.temperature

    with contextlib.ExitStack() as stack:
        student_hidden = stack.enter_context(HiddenCapture(student_out)) \
            if student_out is not None else None
        teacher_hidden = stack.enter_context(HiddenCapture(teacher_out)) \
            if teacher_out is not None else None

        def objective(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            t = t_logits[idx].to(device)
            loss = cfg.alpha * soft_label_bce(out, t, temperature)
            if cfg.alpha < 1:
                loss = loss + (1 - cfg.alpha) * hard_label_bce(out, labels[idx].to(device))
            if projection is not None:
                assert student_hidden is not None and teacher_hidden is not None
                with torch.no_grad():  # the teacher runs on CPU: it may hold CPU-only kernels
                    teacher(dense[idx], sparse[idx])
                hidden = teacher_hidden.value.float().to(device)
                loss = loss + cfg.hint_weight * hint_loss(student_hidden.value, hidden, projection)
            if groups is not None:
                loss = loss + cfg.listwise_weight * listwise_loss(
                    out, t, groups[idx].to(device), temperature)
            return loss

        valid = ctx.calibration() if ctx.calibration else None
        student = train(student, data, TrainConfig(epochs=cfg.epochs, lr=cfg.lr,
                                                   batch_size=cfg.batch_size, seed=ctx.seed),
                        device, valid=valid, objective=objective,
                        extra_params=list(projection.parameters()) if projection else (),
                        max_steps=cfg.max_steps)
    ctx.log(f"{cfg.label()}: student {n_student} vs input {n_input} stored elements")
    return student.cpu()


def nas_trial(model: nn.Module, cfg: NASTrialConfig, ctx: StageContext) -> nn.Module:
    """Train the trial's architecture for `cfg.steps` batches by distillation from `model`."""
    return distill(model, DistillConfig(
        student=cfg.student, epochs=50, lr=cfg.lr, batch_size=cfg.batch_size,
        temperature=cfg.temperature, alpha=1.0, require_smaller=False, max_steps=cfg.steps), ctx)
