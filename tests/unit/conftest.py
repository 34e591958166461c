"""Fixtures shared by the unit tests."""

import pytest

from tasks.data import to_arrays
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.stages import StageContext
from tasks.types import DlrmSpec

SPEC = DlrmSpec(embedding_dim=16, bottom_mlp=(32, 16), top_mlp=(64, 32))


@pytest.fixture(scope="module")
def tiny_dlrm():
    """An untrained small DLRM on the tiny click log: (model, spec, valid rows, stage context)."""
    tables, data_spec = generate("tiny", 0)
    spec = resolve(SPEC, data_spec)
    train, valid = (to_arrays(tables[s], data_spec) for s in ("train", "valid"))
    ctx = StageContext(calibration=lambda: valid, train_data=lambda: train)
    return build(spec, 0), spec, valid, ctx
