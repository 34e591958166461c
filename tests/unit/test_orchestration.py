"""The orchestration bench's accounting (tasks.iostats, flows.orchestration), without a
cluster: the bench itself is `recsqueeze bench --suite orchestration` (docs/benchmarks.md)."""

from __future__ import annotations

import pytest

from flows.orchestration import _split, _stats, _timeline, orchestration_request, plan_bound
from tasks import iostats
from tasks.artifacts import deserialize_model, serialize_model
from tasks.models import build
from tasks.plan import plan
from tasks.types import DlrmSpec
from tasks.types.model import TableSpec


def test_model_serialization_is_counted_and_the_line_round_trips():
    spec = DlrmSpec(tables=(TableSpec(name="a", rows=50),), num_dense=2, embedding_dim=8,
                    bottom_mlp=(8,), top_mlp=(8,))
    iostats.reset()
    blob = serialize_model(build(spec), spec)
    deserialize_model(blob)
    counts = iostats.parse(iostats.line())
    assert counts is not None
    assert counts["serialize"]["bytes"] == counts["deserialize"]["bytes"] == len(blob)
    assert counts["serialize"]["s"] > 0 and counts["s3_get"]["bytes"] == 0
    iostats.reset()
    assert iostats.snapshot()["serialize"] == {"s": 0.0, "bytes": 0}
    assert iostats.parse("started on node 127.0.0.3") is None
    assert iostats.parse(f"{iostats.IO_LINE} not json") is None


def _task(name, start, end, tid):
    return {"id": tid, "name": name, "start_time": f"2026-12-03T10:00:{start:06.3f}+00:00",
            "end_time": f"2026-12-03T10:00:{end:06.3f}+00:00"}


def test_each_task_is_matched_to_its_node_and_its_overhead_split():
    bare = {"a" * 64: 1.0, "b" * 64: 2.0}
    io = {"t1": {"s3_get": {"s": 0.1, "bytes": 10}, "s3_put": {"s": 0.2, "bytes": 5},
                 "serialize": {"s": 0.05, "bytes": 5}},
          "t2": {"s3_get": {"s": 0.0, "bytes": 0}}}
    flow = {"tasks": [_task("run-stage-aaaaaaaa", 0.0, 3.0, "t1"),
                      _task("evaluate-candidate-bbbbbbbb", 3.0, 5.5, "t2"),
                      _task("time-candidates-cccccccc", 5.5, 6.0, "t3")],
            "io": io, "node_of": {"t1": "127.0.0.3", "t2": "127.0.0.3"}}
    split = _split(flow, bare, {"a" * 64: "stage", "b" * 64: "evaluate"})
    assert split["extra"] == pytest.approx([2.0, 0.5])  # running time beyond the bare node's
    assert split["s3"] == pytest.approx([0.3, 0.0]) and split["s3_bytes"] == 15
    assert split["other"] == pytest.approx([1.7, 0.5])
    assert split["first_on_node"] == pytest.approx([2.0]) and split["later"] == [0.5]
    assert split["unmatched"] == ["time-candidates-cccccccc"]
    assert split["task_s"] == pytest.approx(6.0)
    assert split["by_op"] == {"stage": pytest.approx([2.0]), "evaluate": pytest.approx([0.5])}
    assert list(_split(flow, bare)["by_op"]) == ["?"]  # no ops given: one unnamed kind
    stats = _stats([1.0, 2.0, 3.0, 10.0])
    assert stats["median"] == 2.5 and stats["p95"] == 10.0 and stats["sum"] == 16.0
    assert stats["n"] == 4
    assert _stats([])["median"] is None


def test_the_time_outside_tasks_is_split_into_driver_start_end_and_idle_gaps():
    flow = {"start": _task("x", 0, 0, "")["start_time"], "end": None,
            "tasks": [_task("dataset-1", 1.0, 2.0, "t1"), _task("baseline-2", 2.5, 4.0, "t2"),
                      _task("stage-3", 4.0, 6.0, "t3"), _task("stage-4", 4.2, 5.0, "t4"),
                      _task("time-5", 7.0, 8.0, "t5")],
            "node_of": {"t1": "n1", "t2": "n1", "t3": "n1", "t4": "n2", "t5": "n2"}}
    from flows.orchestration import _t
    flow["start"], flow["end"] = _t(flow["start"]), _t(_task("x", 0, 9.5, "")["end_time"])
    out = _timeline(flow)
    assert out["driver_start_s"] == pytest.approx(1.0)
    assert out["driver_end_s"] == pytest.approx(1.5)
    assert out["no_task_running_s"] == pytest.approx(0.5 + 1.0)  # 2.0-2.5 and 6.0-7.0
    # n1: 0.5 then 0.0; n2: 5.0 -> 7.0 is 2.0
    assert out["node_gaps_s"]["sum"] == pytest.approx(2.5)
    assert out["longest_gaps_before"][0] == ["time-5", 2.0]
    assert _timeline({"tasks": [], "node_of": {}})["driver_start_s"] is None


def test_the_plan_bound_follows_the_dependencies():
    request = orchestration_request("tiny")
    graph = plan(request)
    bare = {key: 1.0 for key in graph.nodes}
    # one node: every node after the other, plus what ran outside them
    assert plan_bound(graph, bare, 2.0, 1) == pytest.approx(len(graph.nodes) + 2.0)
    # many nodes: no faster than the longest chain of parents
    depth: dict[str, int] = {}
    for key, node in graph.nodes.items():
        depth[key] = 1 + max((depth[p] for p in node.parents), default=0)
    assert plan_bound(graph, bare, 0.0, 50, barriers=()) == pytest.approx(max(depth.values()))
    two = plan_bound(graph, bare, 0.0, 2)
    assert max(depth.values()) <= two < len(graph.nodes)
    assert two >= len(graph.nodes) / 2
    # run_plan's barriers: dataset, baseline, its evaluation, each alone, then the rest
    firsts = (graph.dataset, graph.baseline, graph.baseline_evaluation)
    rest = {k: d - 2 for k, d in depth.items() if k not in firsts}  # below the baseline
    assert plan_bound(graph, bare, 0.0, 50) == pytest.approx(3 + max(rest.values()))


def test_the_plan_bound_is_a_lower_bound_no_schedule_beats():
    """A lower bound, not a heuristic schedule: a chain a -> b, and c beside it, on 2 nodes.
    The bound is the longest chain; a greedy schedule in plan order that put c first on the
    node a needs would be slower, and a real scheduler may do better than such a schedule."""
    from types import SimpleNamespace as NS  # plan_bound reads nodes and their parents

    graph = NS(nodes={key: NS(parents=parents) for key, parents in
                      (("a", ()), ("c", ()), ("b", ("a",)))})
    bare = {"a": 4.0, "b": 4.0, "c": 1.0}
    assert plan_bound(graph, bare, 0.5, 2, ()) == pytest.approx(8.5)  # a, b one after the other
    assert plan_bound(graph, bare, 0.0, 1, ()) == pytest.approx(9.0)  # all of it on one node
    # the work after t=1 (b: 9 s) on 3 nodes ends at 4: the chain's 10 s is the bound
    bare = {"a": 1.0, "b": 9.0, "c": 1.0}
    assert plan_bound(graph, bare, 0.0, 3, ()) == pytest.approx(10.0)
    # 3 equal chains behind one root on 2 nodes: 1 + max(chain 3, 9 s of work / 2)
    graph = NS(nodes={"r": NS(parents=())})
    for i in range(3):
        graph.nodes[f"x{i}"] = NS(parents=("r",))
        graph.nodes[f"y{i}"] = NS(parents=(f"x{i}",))
    bare = {k: (1.0 if k == "r" else 1.5) for k in graph.nodes}
    assert plan_bound(graph, bare, 0.0, 2, ()) == pytest.approx(1.0 + 9.0 / 2)
    # r as a barrier: r alone, then the chains: the same here (nothing else runs beside r)
    assert plan_bound(graph, bare, 0.0, 2, ("r",)) == pytest.approx(1.0 + 9.0 / 2)
    # x0 as a barrier too: r, x0, then 5 nodes of 1.5 s on 2 nodes (the chain y0 is 1.5)
    assert plan_bound(graph, bare, 0.0, 2, ("r", "x0")) == pytest.approx(1.0 + 1.5 + 7.5 / 2)


def test_the_request_has_every_stage_kind_and_no_search_or_cache():
    request = orchestration_request("tiny")
    assert request.search is None and not request.reuse_results and not request.promote
    kinds = {stage.kind for c in request.candidates for stage in c.plan}
    assert kinds == {"quantize", "prune", "factorize", "distill"}
    graph = plan(request)
    assert any(n.op == "calibrate" for n in graph.nodes.values())  # mixed precision's


def test_a_terminated_command_runs_its_finally_blocks():
    """`timeout` or a scheduler stops a bench with SIGTERM: the CLI exits through its finally
    blocks (where the bench stops the stacks it started), not at once; `app` called
    in-process leaves the caller's SIGTERM handler alone."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os, signal, sys, time
        from flows.cli import app, main

        @app.command("hold")
        def hold() -> None:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
            finally:
                print("stopped what it started", flush=True)

        sys.argv = ["recsqueeze", "hold"]
        main()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 143, done.stderr[-2000:]
    assert "stopped what it started" in done.stdout


def test_the_cli_in_process_leaves_the_callers_sigterm_handler_alone():
    """A test runner or a notebook that calls `app` in-process keeps its SIGTERM handling (the
    program's handler raised SystemExit wherever a pytest worker was when SIGTERM came)."""
    import signal

    from typer.testing import CliRunner

    from flows.cli import app

    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_flow_runs_on_its_worker_nodes_only(tmp_path, monkeypatch):
    """n nodes in the bench are n one-CPU worker nodes: the head holds no CPU (with one it
    was a node more, and the 1-node run ran two tasks at a time beside a one-thread bare
    run)."""
    import flows.orchestration as orchestration

    asked = {}

    class Asked(Exception):
        pass

    def start_stack(state, **kwargs):
        asked.update(kwargs)
        raise Asked

    monkeypatch.setattr(orchestration, "start_stack", start_stack)
    with pytest.raises(Asked):
        orchestration.flow_run(orchestration_request("tiny"), tmp_path, 2, 50, print)
    assert asked["head_cpus"] == 0 and asked["cpus_per_node"] == 1
    assert len(asked["worker_ips"]) == 2


def test_the_docs_table_renders_an_orchestration_file(tmp_path):
    """docs/bench_table.py renders the rows the bench writes (what docs/benchmarks.md shows)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "docs" / "bench_table.py"
    module_spec = importlib.util.spec_from_file_location("bench_table", path)
    assert module_spec is not None and module_spec.loader is not None
    table = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(table)
    stats = _stats([0.1, 0.2])
    flow = {"config": "flow-2-nodes", "nodes": 2, "wall_s": 12.0, "overhead_per_task_s": stats,
            "overhead_first_task_on_node_s": stats, "overhead_later_tasks_s": stats,
            "where": {"s3_s": stats, "other_s": stats}, "unused_node_s": 5.0,
            "parallel_efficiency": 0.4, "plan_bound_efficiency": 0.55, "s3_bytes": 3_000_000,
            "bare_efficiency": 0.35,
            "overhead_by_op_s": {"stage": stats, "evaluate": _stats([])},
            "outside_tasks": {"driver_start_s": 3.2, "driver_end_s": 0.6,
                              "no_task_running_s": 1.5, "node_gaps_s": stats}}
    text = table.render_orchestration([{"config": "bare", "wall_s": 10.0}, flow])
    assert "| flow, 2 node(s) | 12.0 | - | 40% | 35% (55%) |" in text
    assert "| evaluate | - |" in text and "| stage | 2 x 0.15 (0.3) |" in text
    assert "| flow, 2 node(s) | 3.2 | 0.6 | 1.5 | 0.15 / 0.20 | 5.0 | 3 |" in text


def test_the_bare_run_has_one_thread_like_a_one_cpu_node(monkeypatch):
    """The bare process is held to a node's one CPU (torch's intra-op threads), and gets its
    threads back afterwards."""
    import torch

    import flows.orchestration as orchestration

    seen = []
    monkeypatch.setattr(orchestration, "run_plan",
                        lambda graph, executor: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        orchestration.bare_run(orchestration_request("tiny"))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
