"""What a stage may use besides the model: device, seeded RNG, calibration data, a logger."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tasks.data import Arrays


@dataclass
class StageContext:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    calibration: Callable[[], Arrays] | None = None  # lazy: loaded only by stages that need it
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("recsqueeze"))

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def log(self, message: str) -> None:
        self.logger.info(message)
