"""Training, teacher outputs, predictions and calibration give the same bits whatever intra-op
thread count the process has (tasks/determinism.py says which kernels differed, and why)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from tasks.artifacts import serialize_model
from tasks.data import to_arrays
from tasks.determinism import deterministic_algorithms, fixed_threads, reproducible
from tasks.evaluate import predict, predict_logits
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.stages import StageContext, apply_stage
from tasks.stages.calibrate import calibrate, table_bytes
from tasks.train import train
from tasks.types import (
    CalibrateConfig,
    DistillConfig,
    DlrmSpec,
    FactorizeConfig,
    SasrecSpec,
    TrainConfig,
    TwoTowerSpec,
)

SPECS = {
    "dlrm": DlrmSpec(embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(16,)),
    "two_tower": TwoTowerSpec(embedding_dim=16, tower_mlp=(32,)),
    "sasrec": SasrecSpec(embedding_dim=16, heads=2, layers=1, ffn_dim=32),
}
# the process's thread count: each twice, so a run is also compared with its own repeat
PROCESS_THREADS = (1, 2, 1, 2)


@pytest.fixture(scope="module")
def data():
    return generate("tiny", 0)


def _arrays(data, spec):
    tables, ds = data
    return [to_arrays(tables[s], ds, spec.problem_kind(), spec.history_width())
            for s in ("train", "valid", "test")]


# what a process started with n intra-op threads looks like (restored afterwards)
_process_threads = fixed_threads


def _sha(model, spec) -> str:
    return hashlib.sha256(serialize_model(model, spec)).hexdigest()


@pytest.mark.parametrize("family", sorted(SPECS))
def test_training_is_bit_identical_whatever_the_process_thread_count(data, family):
    """Before training fixed its threads, two-tower and SASRec weights differed between 1 and
    2 threads: their train split (4,874 rows) ends in a batch of 10 rows, a matmul MKL splits
    differently on 2 threads, and SASRec's LayerNorm backward sums rows per thread."""
    spec = resolve(SPECS[family], data[1])
    tr, va, te = _arrays(data, spec)
    shas, preds = [], []
    for n in PROCESS_THREADS:
        with _process_threads(n):
            model = train(build(spec, 0), tr, TrainConfig(epochs=1, batch_size=256, seed=3),
                          valid=va)
            shas.append(_sha(model, spec))
            preds.append(predict(model, te))
    assert len(set(shas)) == 1, dict(zip(PROCESS_THREADS, shas))
    for p in preds[1:]:
        assert p.dtype == preds[0].dtype and np.array_equal(p, preds[0])


def test_distillation_with_dropout_is_bit_identical_whatever_the_thread_count(data):
    """A SASRec student (dropout 0.1 draws from torch's RNG) distilled from a teacher scored
    batch by batch inside the objective: the NAS trial's and distill stage's path."""
    spec = resolve(SPECS["sasrec"], data[1])
    tr, va, _ = _arrays(data, spec)
    teacher = build(spec, 1)
    ctx = StageContext(train_data=lambda: tr, calibration=lambda: va, spec=spec, seed=5)
    cfg = DistillConfig(student=SasrecSpec(embedding_dim=8, heads=1, layers=1, ffn_dim=16),
                        epochs=1, batch_size=256)
    shas = []
    for n in PROCESS_THREADS:
        with _process_threads(n):
            student = apply_stage(teacher, cfg, ctx)
            shas.append(_sha(student, student.spec))
    assert len(set(shas)) == 1


def test_teacher_logits_and_calibration_tables_are_bit_identical(data, tiny_dlrm):
    """4,106 rows: inference batches of 4,096 and 10, the matmul that 2 threads split
    differently (calibrate reads every activation through `predict`)."""
    model, spec, _, _ = tiny_dlrm
    rows = _arrays(data, spec)[2].take(slice(0, 4106))
    ctx = StageContext(calibration=lambda: rows)
    cfg = CalibrateConfig(rows=len(rows), sensitivity_rows=len(rows), bins=64)
    logits, tables = [], []
    for n in (1, 2):
        with _process_threads(n):
            logits.append(predict_logits(model, rows, batch_size=4096).tobytes())
            out = calibrate(model, cfg, ctx)
            tables.append((table_bytes(out.activations), table_bytes(out.sensitivity)))
    assert logits[0] == logits[1]
    assert tables[0] == tables[1]


class _Tables(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(5000, 64)


def test_factorized_tables_are_bit_identical_whatever_the_thread_count():
    """MKL's SVD of a 5000 x 64 table gives other bits on 2 threads than on 1 (a Linear
    layer's, and tensor-train cores', came out the same here)."""
    model = _Tables()
    cfg = FactorizeConfig(target="embeddings", rank=8, finetune_epochs=0)
    states = []
    for n in (1, 2):
        with _process_threads(n):
            states.append(apply_stage(model, cfg, StageContext()).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())


def _settings():
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_rng_state())


def _same(a, b):
    return a[:3] == b[:3] and torch.equal(a[3], b[3])


def test_training_leaves_process_wide_settings_as_it_found_them(data):
    """Thread count, deterministic algorithms and the caller's RNG stream, also when training
    fails midway."""
    spec = resolve(SPECS["sasrec"], data[1])
    tr, _, _ = _arrays(data, spec)
    small = tr.take(slice(0, 600))
    with _process_threads(2):
        torch.manual_seed(11)
        before = _settings()
        train(build(spec, 0), small, TrainConfig(epochs=1, batch_size=256, seed=1))
        assert _same(_settings(), before)

        def failing(scores, targets, idx):
            assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
            raise RuntimeError("objective failed")

        with pytest.raises(RuntimeError, match="objective failed"):
            train(build(spec, 0), small, TrainConfig(epochs=1, seed=1), objective=failing)
        assert _same(_settings(), before)  # the caller's RNG stream: as if nothing drew


def test_fixed_threads_restores_the_count_and_refuses_zero():
    with _process_threads(2):
        with fixed_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2

        @fixed_threads(1)
        def inside() -> int:
            return torch.get_num_threads()

        assert inside() == 1 and inside() == 1 and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match=r"n must be >= 1 \(got 0\)"):
            with fixed_threads(0):
                pass
        assert torch.get_num_threads() == 2


def test_deterministic_algorithms_keeps_a_callers_stricter_setting():
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)  # strict: no warn_only
        with deterministic_algorithms():
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    with deterministic_algorithms():
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


def test_reproducible_seeds_dropout_and_gives_the_callers_rng_back():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with reproducible(7):
        a = torch.rand(4)
    with reproducible(7):
        b = torch.rand(4)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
