"""Stage -> Ray resources and placement. GPUs are requested only where the cluster has them."""

from __future__ import annotations

from typing import Any


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster offers (0 when not connected or CPU-only)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def worker_nodes() -> list[str]:
    """Ids of the alive nodes that can run tasks (CPU > 0), in a stable order."""
    import ray

    if not ray.is_initialized():
        return []
    alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    return [n["NodeID"] for n in sorted(alive, key=lambda n: n["NodeManagerAddress"])]


def check_fits_cluster(cpus_per_stage: float, gpus_per_stage: float,
                       serving_device: str = "auto") -> None:
    """Refuse, before any work, a stage size no alive node can hold: Ray would queue the task
    for ever (the flow run would stay RUNNING with nothing to say why); and timing on a GPU
    the cluster does not have."""
    import ray

    if not ray.is_initialized():
        return
    alive = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if serving_device == "cuda" and not any(r.get("GPU", 0) >= 1 for r in alive):
        raise ValueError("resources.serving_device is 'cuda' but no Ray node has a GPU: set "
                         "it to 'auto' or 'cpu', or add a GPU worker group")
    cpus = max((r.get("CPU", 0.0) for r in alive), default=0.0)
    if cpus_per_stage > cpus:
        raise ValueError(f"resources.cpus_per_stage ({cpus_per_stage:g}) is more than any Ray "
                         f"node has (the largest has {cpus:g} CPUs): set it to at most "
                         f"{cpus:g}, or add a larger node")
    gpus = max((r.get("GPU", 0.0) for r in alive), default=0.0)
    if gpus > 0 and gpus_per_stage > gpus:
        raise ValueError(f"resources.gpus_per_stage ({gpus_per_stage:g}) is more than any Ray "
                         f"node has (the largest has {gpus:g} GPUs): set it to at most "
                         f"{gpus:g}")


def gpu_node() -> str | None:
    """Id of the first alive node (by address) with a GPU and a CPU, None when there is none."""
    import ray

    if not ray.is_initialized():
        return None
    alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) >= 1
             and n["Resources"].get("CPU", 0) > 0]
    return min(alive, key=lambda n: n["NodeManagerAddress"])["NodeID"] if alive else None


def exclusive_options(node_id: str | None, gpus: float = 0.0) -> dict[str, Any]:
    """`remote_options` that hold every CPU of `node_id` (soft affinity), and `gpus` of its
    GPUs: no other task is scheduled on that node while this one runs (latency timing)."""
    import ray

    cpus = 1.0
    if node_id is not None and ray.is_initialized():
        cpus = next((n["Resources"].get("CPU", 1.0) for n in ray.nodes()
                     if n["NodeID"] == node_id), 1.0)
    return stage_options(cpus, gpus, gpus, node_id)


def stage_options(cpus: float, gpus: float, available_gpus: float,
                  node_id: str | None = None) -> dict[str, Any]:
    """`remote_options` for one stage task.

    `gpus` is what the request would like; it becomes `num_gpus` only when the cluster has at
    least that many, otherwise the stage runs on CPU (a CPU-only cluster never waits for a GPU
    that will not come). `node_id` pins the task softly to a node: the flow deals candidates
    round-robin over the nodes so they really spread (Ray's SPREAD is best-effort and often
    packs quick tasks onto one node), and a lost node's work still runs elsewhere.
    """
    options: dict[str, Any] = {"num_cpus": cpus}
    if gpus > 0 and available_gpus >= gpus:
        options["num_gpus"] = gpus
    if node_id is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
    return options
