"""The Prefect task runner for a Ray cluster (prefect-ray's RayTaskRunner)."""

from __future__ import annotations

import os

from prefect_ray import RayTaskRunner

from infra.settings import CLIENT_ENV


def use_ray_env(env: dict[str, str]) -> None:
    """Put Ray's auth settings into this process's environment and make Ray see them.

    Ray caches its config (the auth mode among it) the first time anything in the process
    asks; a driver whose cache predates RAY_AUTH_MODE=token fails with InvalidAuthToken. Ray
    refreshes the same cache this way when it turns token auth on itself.
    """
    os.environ.update(env)
    from ray._raylet import Config

    Config.initialize("")


def ray_task_runner(address: str, node_ip: str = "", env: dict[str, str] | None = None,
                    ) -> RayTaskRunner:
    """A RayTaskRunner joined to the cluster at `address` (never a throwaway local one).

    `node_ip` is the driver's address in the cluster (a 127.0.0.x address on the local stack:
    Ray rewrites 127.0.0.1). `env` travels to every task through the job's runtime_env, which
    Ray logs and keeps in its job table: it must hold no secret (`Settings.public_env`); the
    nodes bring their own keys. The Prefect client settings that ride out a server restart
    (`CLIENT_ENV`) travel the same way.
    """
    if not address:
        raise ValueError(
            "ray_address is empty: start the local stack (`recsqueeze up`) or set "
            "RECSQUEEZE_RAY_ADDRESS=host:port of a running Ray cluster"
        )
    init_kwargs: dict = {"log_to_driver": False, "logging_level": "WARNING"}
    if node_ip:
        init_kwargs["_node_ip_address"] = node_ip
    init_kwargs["runtime_env"] = {"env_vars": (env or {}) | CLIENT_ENV}
    return RayTaskRunner(address=address, init_kwargs=init_kwargs)
