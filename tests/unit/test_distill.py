import dataclasses

import numpy as np
import pytest
from pydantic import ValidationError

from tasks.artifacts import deserialize_model, serialize_model
from tasks.data import to_arrays
from tasks.evaluate import predict, stored_elements
from tasks.generator import generate
from tasks.metrics import auc
from tasks.models import build, resolve
from tasks.stages import StageContext, apply_stage
from tasks.train import train
from tasks.types import DistillConfig, DlrmSpec, QuantizeConfig, TrainConfig

TEACHER = DlrmSpec(embedding_dim=32, bottom_mlp=(64, 32), top_mlp=(128, 64))
STUDENT = DlrmSpec(embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(32,))


@pytest.fixture(scope="module")
def setup():
    tables, data_spec = generate("tiny", 0)
    spec = resolve(TEACHER, data_spec)
    tr, va, te = (to_arrays(tables[s], data_spec) for s in ("train", "valid", "test"))
    teacher = train(build(spec, 0), tr, TrainConfig(epochs=2, batch_size=256), valid=va)
    ctx = StageContext(calibration=lambda: va, train_data=lambda: tr, spec=spec)
    return teacher, spec, te, ctx


def test_student_is_smaller_learns_and_round_trips(setup):
    teacher, spec, test, ctx = setup
    student = apply_stage(teacher, DistillConfig(student=STUDENT, epochs=2, batch_size=256), ctx)
    assert stored_elements(student) < stored_elements(teacher) / 3
    assert student.spec.embedding_dim == 8 and student.spec.tables == spec.tables
    a_teacher, a_student = auc(test.label, predict(teacher, test)), auc(test.label, predict(student, test))
    assert a_student > 0.6 and a_student > a_teacher - 0.05
    blob = serialize_model(student, student.spec)
    loaded, loaded_spec = deserialize_model(blob)
    assert loaded_spec.embedding_dim == 8
    assert (predict(loaded, test) == predict(student, test)).all()
    q = apply_stage(student, QuantizeConfig(), ctx)  # distill -> quantize chain
    assert len(serialize_model(q, student.spec)) < len(blob) / 1.5  # dim 8: 16 B/row vs 32


def test_student_not_smaller_is_refused(setup):
    teacher, _, _, ctx = setup
    with pytest.raises(ValueError, match="not fewer than its input"):
        apply_stage(teacher, DistillConfig(student=TEACHER), ctx)


def test_distill_config_validation():
    with pytest.raises(ValidationError, match="alpha"):
        DistillConfig(alpha=1.5)
    cfg = DistillConfig(student=STUDENT)
    assert DistillConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_hint_listwise_and_temperature_losses_train_a_student(setup):
    teacher, spec, test, ctx = setup
    cfg = DistillConfig(student=STUDENT, epochs=2, batch_size=256, temperature=2.0,
                        hint_weight=0.5, listwise_weight=0.5)
    student = apply_stage(teacher, cfg, ctx)
    assert auc(test.label, predict(student, test)) > 0.6
    assert not any("weight" in k and "proj" in k for k in student.state_dict())  # hint head dropped
    assert "T2" in cfg.label() and "hint" in cfg.label() and "listwise" in cfg.label()


def test_served_teacher_outputs_are_used_and_checked(setup):
    teacher, _, _, ctx = setup
    calls = []

    def served():
        calls.append(1)
        return np.zeros(7, np.float32)

    with pytest.raises(ValueError, match="7 teacher outputs for"):
        apply_stage(teacher, DistillConfig(student=STUDENT), dataclasses.replace(
            ctx, teacher_logits=served))
    assert calls == [1]


def test_distill_input_errors_name_the_field(setup):
    teacher, _, _, ctx = setup
    ungrouped = dataclasses.replace(ctx, train_data=lambda: dataclasses.replace(
        ctx.train_data(), groups=None))
    with pytest.raises(ValueError, match="listwise_weight > 0 needs query groups"):
        apply_stage(teacher, DistillConfig(student=STUDENT, listwise_weight=1.0), ungrouped)
    with pytest.raises(ValueError, match="needs the model registry"):
        apply_stage(teacher, DistillConfig(student=STUDENT, teacher="ctr-ranker@production"), ctx)
    with pytest.raises(ValidationError, match="teacher"):
        DistillConfig(teacher="production")
    with pytest.raises(ValidationError, match="temperature"):
        DistillConfig(temperature=0)


def test_hint_from_a_quantized_teacher_uses_its_real_output_layer(setup):
    teacher, _, test, ctx = setup
    quantized = apply_stage(teacher, QuantizeConfig(), ctx)  # int8 Linear: no nn.Linear left
    student = apply_stage(quantized, DistillConfig(student=STUDENT, epochs=1, batch_size=256,
                                                   hint_weight=1.0), ctx)
    assert auc(test.label, predict(student, test)) > 0.6
