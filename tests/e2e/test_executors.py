"""One plan graph, two executors: the flow on Ray and the in-process executor (the bench's)
build the same models and measure the same numbers, whatever the thread count or node."""

from __future__ import annotations

import sys

import pytest
import torch

from flows.driver import run_compress
from tasks.bench import run_suite, suite_request
from tasks.execute import LocalExecutor, fingerprint, run_plan
from tasks.plan import plan
from tasks.types import CompressionRequest, DatasetRequest, Resources, TrainConfig

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def bench_and_run(stack, settings):
    """The dlrm bench suite on tiny, in this process and as a `recsqueeze run` on Ray."""
    rows = run_suite("dlrm", "tiny", log=lambda _: None, timing_seconds=5)
    request = suite_request("dlrm", "tiny", timing_seconds=5).model_copy(
        update={"model_name": "bench-twin", "reuse_results": False})
    return rows, run_compress(request, settings)


def test_bench_and_run_agree_on_every_candidate(bench_and_run):
    rows, report = bench_and_run
    flow = {r.plan: r for r in report.leaderboard}
    assert sorted(flow) == sorted(r["plan"] for r in rows) and len(rows) == 7
    for row in rows:
        twin = flow[row["plan"]]
        # pass/fail and size, and the measured quality itself: bit for bit
        assert (twin.passed, twin.size_bytes) == (row["passed"], row["size_bytes"]), row["plan"]
        assert (twin.quality, twin.delta, twin.loss_ci_high) == (
            row["quality"], row["delta"], row["loss_ci_high"]), row["plan"]
    assert report.baseline.value() == rows[0]["baseline_quality"]


def _defaults() -> CompressionRequest:
    return CompressionRequest(model_name="threads", dataset=DatasetRequest(builtin="tiny"),
                              train=TrainConfig(epochs=1, batch_size=512),
                              resources=Resources(timing_seconds=1))


def _run_local(request_json: str, threads: int) -> dict[str, object]:
    """The default candidates in one process at `threads` intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        request = CompressionRequest.model_validate_json(request_json)
        return fingerprint(run_plan(plan(request), LocalExecutor()))
    finally:
        torch.set_num_threads(before)


def test_same_models_with_one_or_two_threads_in_process_and_on_a_ray_node(stack, settings):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cluster.resources import worker_nodes
    from cluster.runner import use_ray_env
    from flows.driver import driver_env

    request = _defaults().model_dump_json()
    one, two = _run_local(request, 1), _run_local(request, 2)
    assert one["candidates"] and not one["failures"], one["failures"]
    assert one == two
    # the same on a worker node of the cluster, joined as the flow's driver joins it; this
    # test module's function travels by value
    if not ray.is_initialized():
        use_ray_env(driver_env(settings))
        ray.init(address=settings.ray_address, _node_ip_address=settings.ray_node_ip,
                 log_to_driver=False, logging_level="WARNING")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    node = worker_nodes()[-1]
    remote = ray.remote(num_cpus=1)(_run_local).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    assert ray.get(remote.remote(request, 2), timeout=600) == one
