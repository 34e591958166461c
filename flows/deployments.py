"""The deployments users trigger: `compress/on-demand` (the Prefect UI's run form, the REST API,
`run_deployment`), `compress/nightly` (a cron schedule with a time zone) and
`compress/on-import` (a deployment trigger: every new `recsqueeze model import` starts a run
that compresses the imported model on its dataset with its family's defaults).

Two ways to run them, both started by `recsqueeze up`:

- `python -m flows.deployments --state-dir DIR` registers both with the Prefect server and serves
  them: every flow run executes in a subprocess of this process, whose environment names the S3
  store and the Ray cluster, so its tasks run on the cluster (see `flows.compress.cluster_runner`).
  The laptop's default.
- `python -m flows.deployments --state-dir DIR --pool NAME` creates the `process` work pool NAME
  (where missing), registers the three deployments into it and exits; a `prefect worker start --pool
  NAME` process (what production runs, `recsqueeze up --work-pool NAME`) then runs each flow
  run. The deployments' job variables carry the working directory (this checkout, so the
  module entrypoint imports) and the same environment as a served run, without any secret.

Each deployment has a concurrency limit of 1 with the ENQUEUE strategy: a second run of it waits
for the first instead of competing for the same workers (or being refused).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.schedules import Cron

from flows.driver import driver_env, require_prefect_server
from infra.settings import Settings

NIGHTLY_CRON = os.environ.get("RECSQUEEZE_NIGHTLY_CRON", "0 2 * * *")
NIGHTLY_TIMEZONE = os.environ.get("RECSQUEEZE_NIGHTLY_TIMEZONE", "UTC")
# "1": the schedule is registered inactive (a test stack's session may span 02:00 UTC, and a
# nightly run there would promote `ctr-ranker` under the tests' feet); resume it in the UI
NIGHTLY_PAUSED = os.environ.get("RECSQUEEZE_NIGHTLY_PAUSED", "0") == "1"
NIGHTLY_PARAMETERS = {"request": {"dataset": {"builtin": "small"}}}


def on_import() -> DeploymentEventTrigger:
    """A run for each new import (event `recsqueeze.model.imported`, tasks.modelimport): the
    request names the import as its baseline, under the import's name, on its dataset; every
    other field is the default (the family's candidates and budget)."""
    return DeploymentEventTrigger(
        name="compress a new import", expect={"recsqueeze.model.imported"},
        match={"prefect.resource.id": "recsqueeze.import.*"},
        parameters={"request": {"model_name": "{{ event.payload.model }}",
                                "baseline": "{{ event.payload.uri }}",
                                "dataset": {"uri": "{{ event.payload.dataset }}"}}})


def one_at_a_time() -> ConcurrencyLimitConfig:
    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def deployments(job_variables: dict[str, object] | None = None) -> list:  # type: ignore[type-arg]
    from flows.compress import compress

    # imported as `flows.compress` (not loaded from its file as a top-level `compress`): what
    # Ray pickles for the workers must name modules they can import

    on_demand = compress.to_deployment(
        name="on-demand", concurrency_limit=one_at_a_time(), tags=["recsqueeze"],
        entrypoint_type=EntrypointType.MODULE_PATH, job_variables=job_variables,
        description="Compress, gate and promote; triggered from the UI form, the REST API or "
                    "run_deployment. Every request field is described in the form.")
    nightly = compress.to_deployment(
        name="nightly", schedules=[Cron(NIGHTLY_CRON, timezone=NIGHTLY_TIMEZONE,
                                        active=not NIGHTLY_PAUSED)],
        parameters=NIGHTLY_PARAMETERS, concurrency_limit=one_at_a_time(), tags=["recsqueeze"],
        entrypoint_type=EntrypointType.MODULE_PATH, job_variables=job_variables,
        description=f"The default candidates on the built-in `small` click log, "
                    f"{NIGHTLY_CRON} ({NIGHTLY_TIMEZONE}).")
    imported = compress.to_deployment(
        name="on-import", triggers=[on_import()], concurrency_limit=one_at_a_time(),
        tags=["recsqueeze"], entrypoint_type=EntrypointType.MODULE_PATH,
        job_variables=job_variables,
        description="Started by each new `recsqueeze model import`: compresses the imported "
                    "model on its dataset with its family's default candidates and budget.")
    return [on_demand, nightly, imported]


def cluster_env(settings: Settings) -> dict[str, str]:
    """What a served flow run needs to find the Prefect API, S3 and the Ray cluster."""
    env = driver_env(settings) | settings.public_env() | {
        "RECSQUEEZE_PREFECT_API_URL": settings.prefect_api_url,
        "RECSQUEEZE_RAY_ADDRESS": settings.ray_address,
        "RECSQUEEZE_RAY_NODE_IP": settings.ray_node_ip,
        "RECSQUEEZE_RAY_AUTH_TOKEN_PATH": settings.ray_auth_token_path,
    }
    return {k: v for k, v in env.items() if v}


def register_in_pool(settings: Settings, pool: str) -> list[str]:
    """Create the `process` work pool `pool` where it is missing and register both deployments
    into it (updated in place when they exist); their ids. A pool of another type is refused:
    its worker would not run these job variables."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    from flows.stack import REPO

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            found = client.create_work_pool(WorkPoolCreate(
                name=pool, type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
                description="recsqueeze flow runs: a `prefect worker start` process runs each"))
        if found.type != "process":
            raise ValueError(f"work pool {pool!r} is a {found.type!r} pool; recsqueeze up runs "
                             "a process worker: name a new pool or a process one")
    job = {"working_dir": str(REPO), "env": cluster_env(settings)}
    return [str(d.apply(work_pool_name=pool)) for d in deployments(job)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=Path(".recsqueeze"))
    parser.add_argument("--pool", default=None,
                        help="register into this process work pool and exit (no serving)")
    args = parser.parse_args()
    from flows.stack import settings_for

    settings = settings_for(args.state_dir)
    require_prefect_server(settings)
    os.environ.update(cluster_env(settings))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # the server this process registers with and its flow runs report to (never a temporary
    # one): settings read at import time may predate the variables set above
    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        if args.pool:
            register_in_pool(settings, args.pool)
            return
        serve(*deployments(), print_starting_message=False)


if __name__ == "__main__":
    main()
