"""Session fixtures: a real local stack (SeaweedFS S3, Prefect server, Ray head + worker).

The stack is started on free ports and its own loopback addresses (127.0.0.12 / .13, so a
running demo stack on .2/.3 is never touched) and stopped at the end: only what was started.
Under pytest-xdist (`make test` runs two workers, a test file each at a time) every worker
starts its own stack, worker k on 127.0.0.(12 + 2k) / (13 + 2k).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import QUIET_ENV, Settings

os.environ.update(QUIET_ENV)
# the test stacks' nightly schedule is registered paused: a session that spans 02:00 UTC would
# otherwise run the default request there (a CI run lost its README test to that ctr-ranker)
os.environ["RECSQUEEZE_NIGHTLY_PAUSED"] = "1"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from flows.stack import start_stack, stop_stack

    state = tmp_path_factory.mktemp("stack")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    k = int(worker) if worker.isdigit() else 0
    started = start_stack(Path(state), head_ip=f"127.0.0.{12 + 2 * k}",
                          worker_ips=(f"127.0.0.{13 + 2 * k}",))
    added = started.settings().s3_env()
    saved = {name: os.environ.get(name) for name in added}
    os.environ.update(added)
    try:
        yield started
    finally:
        # only what was set is put back: a wholesale rewrite of the environment can crash a
        # thread (Ray's, Prefect's) reading it at the same time
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        stop_stack(started)


@pytest.fixture(scope="session")
def settings(stack) -> Settings:  # type: ignore[no-untyped-def]
    return stack.settings()  # type: ignore[no-any-return]


@pytest.fixture()
def store(settings: Settings):  # type: ignore[no-untyped-def]
    from tasks.artifacts import ArtifactStore

    return ArtifactStore(settings)
