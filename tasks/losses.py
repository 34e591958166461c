"""Distillation losses for CTR models. All take logits (not probabilities) and return a scalar
mean over the batch; each is checked against a hand-computed value in tests/unit/test_losses.py.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def hard_label_bce(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE of the student on the clicks."""
    return F.binary_cross_entropy_with_logits(student, labels)


def soft_label_bce(student: torch.Tensor, teacher: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """BCE of sigmoid(student/T) against the teacher's sigmoid(teacher/T), times T².

    At T = 1 this is BCE on the teacher's click probabilities. T > 1 softens both sides (more
    weight on the teacher's ranking of unlikely clicks); the T² factor keeps the gradient scale
    independent of T (Hinton et al., 2015).
    """
    t = temperature
    return t * t * F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t))


def hint_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
              projection: nn.Module) -> torch.Tensor:
    """Mean squared error between projection(student hidden) and the teacher's hidden layer
    (FitNets, Romero et al., 2015); the projection is learned with the student."""
    return F.mse_loss(projection(student_hidden), teacher_hidden)


def listwise_loss(student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """ListNet-style ranking distillation: within each query group, cross entropy between the
    teacher's softmax over the group's items and the student's (both over logits / T), averaged
    over the groups with two or more rows (a one-row group has nothing to rank), times T².
    `groups` labels rows by group.
    """
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    n = counts.numel()
    s, t = student / temperature, teacher / temperature

    def log_softmax(x: torch.Tensor) -> torch.Tensor:
        top = torch.full((n,), -torch.inf, dtype=x.dtype, device=x.device)
        top = top.scatter_reduce(0, inverse, x.detach(), reduce="amax")
        shifted = x - top[inverse]
        norm = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, inverse, shifted.exp())
        return shifted - norm.log()[inverse]

    p_teacher = log_softmax(t).exp()
    per_row = -p_teacher * log_softmax(s)
    per_group = torch.zeros(n, dtype=s.dtype, device=s.device).index_add(0, inverse, per_row)
    ranked = counts >= 2
    if not ranked.any():
        return s.sum() * 0.0  # keeps the graph; no group to rank in this batch
    # times T², like soft_label_bce, so the temperature does not scale the gradient down
    return temperature * temperature * per_group[ranked].mean()


def output_layer(model: nn.Module, *probe: torch.Tensor) -> tuple[nn.Module, int]:
    """The last leaf module a forward pass on `probe` runs (the output layer, whatever its
    kind: Linear, quantized, low-rank part) and the width of its input: the hidden layer the
    hint loss matches."""
    order: list[tuple[nn.Module, int]] = []

    def record(module: nn.Module, args: tuple[object, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
            order.append((module, args[0].shape[-1]))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if not list(m.children())]
    try:
        with torch.no_grad():
            model(*probe)
    finally:
        for hook in hooks:
            hook.remove()
    if not order:
        raise ValueError("hint loss: the model runs no layer on a [batch, features] input to "
                         "take a hint from; set hint_weight to 0")
    return order[-1]


class HiddenCapture:
    """Records the input of `module` on every forward (a forward pre-hook); use as a context."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.value = module, None

    def __enter__(self) -> HiddenCapture:
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.value = args[0]
