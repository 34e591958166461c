"""Every distillation loss against a value computed by hand (in the comments)."""

import math

import pytest
import torch
from torch import nn

from tasks.losses import (
    HiddenCapture,
    hard_label_bce,
    hint_loss,
    listwise_loss,
    output_layer,
    soft_label_bce,
)

LN3 = math.log(3.0)


def close(value: torch.Tensor, expected: float) -> bool:
    return value.item() == pytest.approx(expected, abs=1e-6)


def test_hard_label_bce():
    # rows: sigmoid(0)=0.5 with click -> ln 2; sigmoid(ln 3)=0.75 without click -> -ln 0.25
    loss = hard_label_bce(torch.tensor([0.0, LN3]), torch.tensor([1.0, 0.0]))
    assert close(loss, (math.log(2) + math.log(4)) / 2)  # 1.0397208


def test_soft_label_bce_is_bce_on_teacher_probabilities():
    # teacher p = sigmoid(ln 3) = 0.75; student at 0.5: -(0.75 ln .5 + .25 ln .5) = ln 2
    assert close(soft_label_bce(torch.tensor([0.0]), torch.tensor([LN3])), math.log(2))
    # student = teacher: the entropy of 0.75, 0.5623351
    assert close(soft_label_bce(torch.tensor([LN3]), torch.tensor([LN3])),
                 -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_soft_label_bce_temperature_scales_both_sides_and_by_t_squared():
    # T=2: student 2 ln 3 -> sigmoid(ln 3) = 0.75; teacher 0 -> 0.5
    # 4 * -(0.5 ln 0.75 + 0.5 ln 0.25) = 3.3479521
    loss = soft_label_bce(torch.tensor([2 * LN3]), torch.tensor([0.0]), temperature=2.0)
    assert close(loss, 4 * -(0.5 * math.log(0.75) + 0.5 * math.log(0.25)))


def test_hint_loss_through_the_projection():
    proj = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 2.0]]))
    # projections 3 and 2 against 1 and 2: ((3-1)^2 + 0) / 2 = 2
    loss = hint_loss(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), torch.tensor([[1.0], [2.0]]), proj)
    assert close(loss, 2.0)
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_listwise_loss_per_query_group():
    # group 7: student softmax [.25, .75], teacher [.5, .5] -> -(.5 ln .25 + .5 ln .75) = 0.836988
    # group 9: one row, nothing to rank -> left out of the mean
    # group 1: student uniform over 3, teacher [1/4, 1/2, 1/4] -> ln 3 = 1.0986123
    student = torch.tensor([0.0, LN3, 5.0, 0.0, 0.0, 0.0], requires_grad=True)
    teacher = torch.tensor([0.0, 0.0, -3.0, 0.0, math.log(2), 0.0])
    groups = torch.tensor([7, 7, 9, 1, 1, 1])
    loss = listwise_loss(student, teacher, groups)
    g7 = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert close(loss, (g7 + math.log(3)) / 2)
    loss.backward()
    assert student.grad[2] == 0 and student.grad[:2].abs().sum() > 0
    # temperature divides both: teacher [0, 2 ln 2, 0] at T=2 is the same distribution; the
    # loss is then scaled by T² = 4
    loss_t = listwise_loss(torch.zeros(3), torch.tensor([0.0, 2 * math.log(2), 0.0]),
                           torch.tensor([4, 4, 4]), temperature=2.0)
    assert close(loss_t, 4 * math.log(3))


def test_listwise_loss_without_groups_to_rank_is_zero_with_a_graph():
    student = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = listwise_loss(student, torch.tensor([0.0, 1.0]), torch.tensor([1, 2]))
    assert loss.item() == 0.0
    loss.backward()  # still differentiable


def test_output_layer_is_the_last_layer_run_and_capture():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    layer, width = output_layer(model, torch.ones(2, 3))
    assert layer is model[2] and width == 4
    with HiddenCapture(layer) as cap:
        model(torch.ones(2, 3))
    assert cap.value.shape == (2, 4)
    with pytest.raises(ValueError, match="no layer on a"):
        output_layer(nn.Flatten(0), torch.ones(3))
