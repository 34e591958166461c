"""Which device candidates are timed on, and timing them there side by side with the baseline.

A candidate is timed on the serving device (`serving_device`); one whose modules have no
kernel there (a CPU-only quantized op) is timed on CPU with its own copy of the baseline beside
it, so every ratio compares two models on one device and every row names that device."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from tasks.data import Arrays
from tasks.evaluate import device_label, latency_ratios
from tasks.runtime import device
from tasks.types import Latency, LatencyRatio

Timed = tuple[tuple[Latency, ...], tuple[Latency, ...], tuple[LatencyRatio, ...]]


def serving_device(choice: str) -> torch.device:
    """The device candidates are timed on: `cuda` when asked for or (auto) when Ray gave
    this task a GPU, else CPU. Asking for cuda without one is an error, not a CPU timing."""
    here = device()
    if choice == "cuda" and here.type != "cuda":
        raise ValueError("resources.serving_device is 'cuda' but the timing task got no GPU "
                         "(the Ray cluster has none, or torch here has no CUDA): set it to "
                         "'auto' or 'cpu', or add a GPU worker group")
    return here if choice in ("auto", "cuda") else torch.device("cpu")


def runs_on(model: nn.Module, dev: torch.device, data: Arrays) -> str | None:
    """None when one batch of `data` goes through `model` on `dev`; else why not (and the
    model is back on CPU)."""
    if dev.type == "cpu":
        return None
    try:
        with torch.inference_mode():
            model.to(dev).eval()(torch.from_numpy(data.dense[:8]).to(dev),
                                 torch.from_numpy(data.sparse[:8]).to(dev))
        return None
    except (RuntimeError, NotImplementedError) as exc:
        model.cpu()
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def time_on_devices(reference: nn.Module, models: list[nn.Module], test: Arrays, *,
                    target: torch.device, iters: int, max_seconds: float,
                    warn: Callable[[int, str], None]) -> list[Timed]:
    """(baseline latency, latencies, ratios) for each of `models`, in order: on `target` where
    the model runs there, else on CPU (`warn(i, why)` is told which and why). The time budget
    is split evenly between the devices used."""
    groups: dict[torch.device, list[int]] = {}
    for i, model in enumerate(models):
        why = runs_on(model, target, test)
        if why is not None:
            warn(i, f"cannot run on {device_label(target)} ({why}); timed on CPU")
        groups.setdefault(target if why is None else torch.device("cpu"), []).append(i)
    timed: dict[int, Timed] = {}
    for dev, members in groups.items():
        base_lat, lats, ratios = latency_ratios(
            copy.deepcopy(reference) if len(groups) > 1 else reference,
            [models[i] for i in members], test, iters=iters,
            max_seconds=max_seconds / len(groups), device=dev)
        timed |= {i: (base_lat, lat, ratio) for i, lat, ratio in zip(members, lats, ratios)}
    return [timed[i] for i in range(len(models))]
