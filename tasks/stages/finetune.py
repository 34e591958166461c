"""Fine-tuning after a structural change, with the one training loop."""

from __future__ import annotations

from torch import nn

from tasks.data import Arrays
from tasks.stages.context import StageContext
from tasks.train import train
from tasks.types import TrainConfig


def finetune(model: nn.Module, epochs: int, lr: float, ctx: StageContext) -> nn.Module:
    """`epochs` passes over the train split (none when 0), best epoch on valid kept."""
    if epochs == 0:
        return model
    data = ctx.need("train_data")
    valid = ctx.calibration() if ctx.calibration else None
    assert isinstance(data, Arrays)
    return train(model, data, TrainConfig(epochs=epochs, lr=lr, seed=ctx.seed), ctx.device,
                 valid=valid, normalize=False)
