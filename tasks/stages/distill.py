"""distill: a smaller student trained to imitate a teacher (soft labels with temperature, hard
labels, a hidden-layer hint with a learned projection, listwise ranking over query groups)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from tasks.data import Arrays
from tasks.evaluate import stored_elements
from tasks.losses import HiddenCapture, hint_loss, listwise_loss, output_layer
from tasks.models import build
from tasks.objectives import soft_loss, target_loss, train_scores
from tasks.protocol import problem_kind
from tasks.stages.context import NotApplicable, StageContext
from tasks.train import train
from tasks.types import MODEL_SPECS, DistillConfig, ModelSpec, NASTrialConfig, TrainConfig


def _teacher(model: nn.Module, cfg: DistillConfig,
             ctx: StageContext) -> tuple[nn.Module, np.ndarray | None]:
    """The teacher and, for a ranking teacher, its logits on the train rows (a retrieval
    teacher's catalogue scores are computed batch by batch instead)."""
    if cfg.teacher == "input":
        ranking = problem_kind(model) == "ranking"
        return model, ctx.input_logits(model) if ranking else None
    if ctx.registry_teacher is None:
        raise ValueError(f"distill.teacher={cfg.teacher!r} needs the model registry: run the "
                         "stage inside the compress flow, or use teacher='input'")
    return ctx.registry_teacher(cfg.teacher)


def student_spec(cfg_student: ModelSpec, input_spec: ModelSpec) -> ModelSpec:
    """The student's spec with its data-dependent fields taken from the input model's."""
    if cfg_student.family != input_spec.family:
        raise ValueError(
            f"distill.student.family is {cfg_student.family!r} but the input model is "
            f"{input_spec.family!r}: a student has its teacher's family (set student.family "
            f"to {input_spec.family!r} and its size fields)")
    return cfg_student.model_copy(update={
        "tables": input_spec.tables, "num_dense": input_spec.num_dense,
        "item_table": input_spec.item_table,
        "item_feature_tables": input_spec.item_feature_tables})


def distill(model: nn.Module, cfg: DistillConfig, ctx: StageContext) -> nn.Module:
    """Return a student trained to imitate the teacher (`model`, or cfg.teacher from the
    registry). The student's spec is on its `spec` attribute, so the artifact records the new
    architecture.

    Ranking: soft labels from the teacher's stored logits (BCE at temperature T), hard labels,
    hint, listwise. Retrieval / next_item: the student and the teacher score the same items
    (the batch's clicked items for an in-batch student like two-tower, else the catalogue), and
    the soft term is the cross entropy of their softmaxes at temperature T (times T²)."""
    input_spec = ctx.need("spec")
    assert isinstance(input_spec, MODEL_SPECS)
    spec = student_spec(cfg.student, input_spec)
    kind = spec.problem_kind()
    student = build(spec, ctx.seed)
    n_student, n_input = stored_elements(student), stored_elements(model)
    if cfg.require_smaller and n_student >= n_input:
        raise NotApplicable(
            f"distill.student has {n_student} stored elements, not fewer than its input model's "
            f"{n_input}; shrink student.embedding_dim or its MLP widths (layers, heads), or set "
            "require_smaller=false")
    data = ctx.need("train_data")
    assert isinstance(data, Arrays)
    teacher, logits = _teacher(model, cfg, ctx)
    if logits is not None and len(logits) != len(data):
        raise ValueError(f"distill.teacher: {len(logits)} teacher outputs for {len(data)} train "
                         "rows; the teacher was scored on other data")
    if kind != "ranking" and (cfg.hint_weight or cfg.listwise_weight):
        raise ValueError(f"distill.hint_weight and listwise_weight apply to ranking models; "
                         f"{spec.family} is a {kind} model (set them to 0)")
    groups = None
    if cfg.listwise_weight:
        if data.groups is None:
            raise ValueError("distill.listwise_weight > 0 needs query groups: set the dataset "
                             "spec's query_id column, or set listwise_weight to 0")
        groups = torch.from_numpy(data.groups)

    device = ctx.device
    t_logits = torch.from_numpy(logits.astype(np.float32)) if logits is not None else None
    dense, sparse = torch.from_numpy(data.dense), torch.from_numpy(data.sparse)
    label = torch.from_numpy(data.label)
    projection, teacher_out = None, None
    student_out = None
    if cfg.hint_weight:
        probe = dense[:2], sparse[:2]
        teacher.eval()
        teacher_out, teacher_width = output_layer(teacher, *probe)
        student_out, student_width = output_layer(student, *probe)
        projection = nn.Linear(student_width, teacher_width, bias=False).to(device)
    temperature = cfg.temperature
    teacher.eval()

    with contextlib.ExitStack() as stack:
        student_hidden = stack.enter_context(HiddenCapture(student_out)) \
            if student_out is not None else None
        teacher_hidden = stack.enter_context(HiddenCapture(teacher_out)) \
            if teacher_out is not None else None

        def objective(out: torch.Tensor, targets: torch.Tensor,
                      idx: torch.Tensor) -> torch.Tensor:
            if t_logits is not None:
                t = t_logits[idx].to(device)
            else:  # the teacher runs on CPU: it may hold CPU-only kernels
                with torch.no_grad():
                    t, _ = train_scores(teacher, kind, dense[idx], sparse[idx], label[idx],
                                        items_of=student)
                t = t.to(device)
            loss = cfg.alpha * soft_loss(kind, out, t, temperature)
            if cfg.alpha < 1:
                loss = loss + (1 - cfg.alpha) * target_loss(kind, out, targets)
            if projection is not None:
                assert student_hidden is not None and teacher_hidden is not None
                with torch.no_grad():
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
