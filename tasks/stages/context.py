"""What a stage may use besides the model: device, seeded RNG, calibration data and tables,
the run's budget, a logger. Everything heavy is lazy: a stage loads only what it uses."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from tasks.data import Arrays
from tasks.types import ModelSpec


@dataclass
class StageContext:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    calibration: Callable[[], Arrays] | None = None  # calibration rows (valid split)
    train_data: Callable[[], Arrays] | None = None  # fine-tuning rows (train split)
    activations: Callable[[], pa.Table] | None = None  # calibrate stage's range table
    sensitivity: Callable[[], pa.Table] | None = None  # calibrate stage's sensitivity table
    max_relative_auc_loss: float | None = None  # the run's AUC budget, as a fraction
    spec: ModelSpec | None = None  # the input model's spec (distill builds its student from it)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("recsqueeze"))

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def log(self, message: str) -> None:
        self.logger.info(message)

    def need(self, name: str) -> object:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this stage needs ctx.{name}: run the calibrate stage first "
                             "(the flow does this when a plan asks for it)")
        return value() if callable(value) else value
