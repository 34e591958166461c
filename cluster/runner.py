"""The Prefect task runner for a Ray cluster (prefect-ray's RayTaskRunner)."""

from __future__ import annotations

from prefect_ray import RayTaskRunner


def ray_task_runner(address: str, node_ip: str = "", env: dict[str, str] | None = None,
                    ) -> RayTaskRunner:
    """A RayTaskRunner joined to the cluster at `address` (never a throwaway local one).

    `node_ip` is the driver's address in the cluster (a 127.0.0.x address on the local stack:
    Ray rewrites 127.0.0.1). `env` travels to every task through the job's runtime_env, so a
    remote cluster's workers reach the same S3 store without any setting on the nodes.
    """
    if not address:
        raise ValueError(
            "ray_address is empty: start the local stack (`recsqueeze up`) or set "
            "RECSQUEEZE_RAY_ADDRESS=host:port of a running Ray cluster"
        )
    init_kwargs: dict = {"log_to_driver": False, "logging_level": "WARNING"}
    if node_ip:
        init_kwargs["_node_ip_address"] = node_ip
    if env:
        init_kwargs["runtime_env"] = {"env_vars": env}
    return RayTaskRunner(address=address, init_kwargs=init_kwargs)
