"""The GPU paths, on a CUDA machine (skipped elsewhere; run on a lent GPU, see the closing
notes): training and every stage with a CUDA device, each family, and compressed modules
evaluated on CUDA tensors (their non-CPU fallbacks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.data import to_arrays
from tasks.evaluate import predict
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.stages import StageContext, apply_stage
from tasks.train import train
from tasks.types import (
    DistillConfig,
    DlrmSpec,
    FactorizeConfig,
    PruneConfig,
    QuantizeConfig,
    SasrecSpec,
    TrainConfig,
    TwoTowerSpec,
    parse_model_spec,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")

STUDENTS = {
    "dlrm": DlrmSpec(embedding_dim=16, bottom_mlp=(32, 16), top_mlp=(64,)),
    "two_tower": TwoTowerSpec(embedding_dim=32, tower_mlp=(64,)),
    "sasrec": SasrecSpec(layers=1, heads=1),
}


@pytest.fixture(scope="module", params=sorted(STUDENTS))
def trained(request):
    tables, data = generate("tiny")
    spec = resolve(parse_model_spec({"family": request.param}), data)
    task = spec.problem_kind()
    tr, va, te = (to_arrays(tables[s], data, task, spec.history_width())
                  for s in ("train", "valid", "test"))
    model = train(build(spec), tr, TrainConfig(epochs=2, batch_size=256), CUDA, valid=va)
    assert next(model.parameters()).is_cuda  # trained where Ray's GPU was
    ctx = StageContext(device=CUDA, train_data=lambda: tr, calibration=lambda: va, spec=spec)
    return model.cpu(), spec, te, ctx


def _close(model, test, reference=None):
    on_cpu = predict(model.cpu(), test)
    on_gpu = predict(model.to(CUDA), test, device=CUDA)
    model.cpu()
    if on_cpu.dtype == np.int64:  # ranks: a float tie may move an item by a place or two
        assert np.mean(np.abs(on_cpu - on_gpu) <= 2) > 0.98
    else:
        np.testing.assert_allclose(on_cpu, on_gpu, atol=2e-3)
    return on_cpu


def test_a_model_trained_on_cuda_scores_the_same_on_cpu_and_gpu(trained):
    model, _, test, _ = trained
    _close(model, test)


@pytest.mark.parametrize("cfg", [
    PruneConfig(method="structured", sparsity=0.5),
    PruneConfig(method="magnitude", sparsity=0.5, steps=2),
    FactorizeConfig(target="tt_embeddings", rank=8),
    FactorizeConfig(target="linear", rank=8),
    QuantizeConfig(linear="int8_weight_only", embeddings="rowwise_int4"),
    QuantizeConfig(linear="dynamic_int8", embeddings="rowwise_int8"),
    QuantizeConfig(linear="int8_weight_only", embeddings="tiered_int4_int2", finetune_epochs=1),
], ids=lambda c: c.label())
def test_every_stage_runs_with_a_cuda_device(trained, cfg):
    model, _, test, ctx = trained
    out = apply_stage(model, cfg, ctx)
    assert not any(t.is_cuda for t in out.state_dict().values())  # stored from the CPU
    _close(out, test)


def test_distillation_on_cuda(trained):
    model, spec, test, ctx = trained
    student = apply_stage(model, DistillConfig(student=STUDENTS[spec.family], epochs=1,
                                               batch_size=256, require_smaller=False), ctx)
    _close(student, test)


def test_two_four_stage_on_sparse_tensor_cores(trained):
    model, spec, test, ctx = trained
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("sparse tensor cores need compute capability >= 8.0")
    try:
        out = apply_stage(model, PruneConfig(method="semi_structured", sparsity=0.5), ctx)
    except ValueError as exc:  # no layer of a shape the kernel takes (e.g. narrow towers)
        assert "no Linear layer has a shape" in str(exc)
        return
    assert any(type(m).__name__ == "SemiSparseLinear" for m in out.modules())
    on_gpu = predict(out.to(CUDA), test, device=CUDA)
    assert np.isfinite(on_gpu).all()
