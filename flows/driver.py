"""Run a flow against the configured services (never an ephemeral Prefect server)."""

from __future__ import annotations

import os
import urllib.request

from cluster.local import ray_env
from cluster.runner import ray_task_runner, use_ray_env
from infra.settings import CLIENT_ENV, QUIET_ENV, Settings
from tasks.types import CompressionRequest, GateReport


def require_prefect_server(settings: Settings) -> None:
    """Refuse to run without a real Prefect server: without one every Ray worker would start
    its own temporary server on one SQLite file (slow, and its logs are lost)."""
    if not settings.prefect_api_url:
        raise RuntimeError(
            "prefect_api_url is empty: start the stack (`recsqueeze up`) or set "
            "RECSQUEEZE_PREFECT_API_URL=http://HOST:PORT/api of a running Prefect server"
        )
    try:
        with urllib.request.urlopen(settings.prefect_api_url.rstrip("/") + "/health",
                                    timeout=5) as resp:
            resp.read()
    except OSError as exc:
        raise RuntimeError(
            f"Prefect server at {settings.prefect_api_url} does not answer ({exc}); "
            "start it with `recsqueeze up` or fix RECSQUEEZE_PREFECT_API_URL"
        ) from exc


def driver_env(settings: Settings) -> dict[str, str]:
    env = QUIET_ENV | CLIENT_ENV | {"PREFECT_API_URL": settings.prefect_api_url}
    return env | ray_env(settings.ray_auth_token_path)


def run_compress(request: CompressionRequest, settings: Settings,
                 run_name: str | None = None) -> GateReport:
    """Validate services, then run `compress` on the Ray cluster from `settings` (as a flow
    run named `run_name`: the CLI's progress finds it by that name)."""
    require_prefect_server(settings)
    os.environ.update(settings.s3_env())
    use_ray_env(driver_env(settings))
    import prefect.settings
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.compress import compress

    runner = ray_task_runner(settings.ray_address, settings.ray_node_ip, settings.worker_env())
    # settings read at import predate the environment set above: name them again
    client = {getattr(prefect.settings, name): value for name, value in CLIENT_ENV.items()}
    options: dict[str, object] = {"flow_run_name": run_name} if run_name else {}
    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url, **client}):
        return compress.with_options(task_runner=runner, **options)(request)  # type: ignore[arg-type]
