"""What a stage may use besides the model: device, seeded RNG, calibration data and tables,
the run's budget, a logger. Everything heavy is lazy: a stage loads only what it uses."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from tasks.data import Arrays
from tasks.evaluate import predict_logits
from tasks.types import ModelSpec


class StageSkipped(Exception):  # noqa: N818 (a verdict, not an error)
    """The stage cannot run on this worker (e.g. 2:4 sparsity without a CUDA GPU). The flow
    reports the candidate as skipped, with this message, and goes on with the others."""


class NotApplicable(ValueError):  # noqa: N818 (a verdict, not an error)
    """The config cannot apply to this model: nothing would get smaller, or the model's shape
    does not fit it. A default candidate (one the user did not choose) that cannot apply is
    reported as skipped with this message; a candidate the user listed fails with it."""


@dataclass
class StageContext:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    calibration: Callable[[], Arrays] | None = None  # calibration rows (valid split)
    train_data: Callable[[], Arrays] | None = None  # fine-tuning rows (train split)
    activations: Callable[[], pa.Table] | None = None  # calibrate stage's range table
    sensitivity: Callable[[], pa.Table] | None = None  # calibrate stage's sensitivity table
    max_relative_loss: float | None = None  # the run's budget on the main metric, a fraction
    spec: ModelSpec | None = None  # the input model's spec (distill builds its student from it)
    # the input model's logits on the train rows; the flow serves them from S3, computed once
    # per (model, dataset). None: computed here when a stage needs them.
    teacher_logits: Callable[[], np.ndarray] | None = None
    # "NAME@ALIAS" / "NAME@vN" -> (registry model, its logits on the train rows: ranking only)
    registry_teacher: Callable[[str], tuple[nn.Module, np.ndarray | None]] | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("recsqueeze"))

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def log(self, message: str) -> None:
        self.logger.info(message)

    def input_logits(self, model: nn.Module) -> np.ndarray:
        """Logits of `model` (the stage's input) on the train rows: served, or computed once."""
        if self.teacher_logits is not None:
            return self.teacher_logits()
        data = self.need("train_data")
        assert isinstance(data, Arrays)
        return predict_logits(model, data)

    def need(self, name: str) -> object:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this stage needs ctx.{name}: run the calibrate stage first "
                             "(the flow does this when a plan asks for it)")
        return value() if callable(value) else value
