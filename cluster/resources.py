"""Stage -> Ray resources. GPUs are requested only where the cluster has them."""

from __future__ import annotations

from typing import Any


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster offers (0 when not connected or CPU-only)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def stage_options(cpus: float, gpus: float, available_gpus: float,
                  spread: bool = True) -> dict[str, Any]:
    """`remote_options` for one stage task.

    `gpus` is what the request would like; it becomes `num_gpus` only when the cluster has at
    least that many, otherwise the stage runs on CPU (a CPU-only cluster never waits for a GPU
    that will not come). SPREAD puts sibling candidates on different nodes.
    """
    options: dict[str, Any] = {"num_cpus": cpus}
    if gpus > 0 and available_gpus >= gpus:
        options["num_gpus"] = gpus
    if spread:
        options["scheduling_strategy"] = "SPREAD"
    return options
