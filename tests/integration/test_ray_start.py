"""A Ray cluster that does not come up says where to look and leaves nothing running."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cluster.local import start_local_cluster
from infra.process import alive

HEAD, WORKER = "127.0.0.40", "127.0.0.41"  # no other test's stack uses them


def _running_with(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(
                    errors="replace").replace("\0", " ") and alive(int(proc.name)):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def _squatting(local, monkeypatch, starts: int) -> list[socket.socket]:
    """The worker's node-manager port is taken by the time its raylet binds it (what an
    outgoing connection's source port did to a port block in the ephemeral range) on its
    first `starts` starts."""
    squatters: list[socket.socket] = []
    chosen = local._node_ports

    def taken_port(ip: str, head: bool) -> list[str]:
        args = chosen(ip, head)
        if ip == WORKER and len(squatters) < starts:
            port = int(next(a for a in args if a.startswith("--node-manager-port=")
                            ).split("=")[1])
            squatter = socket.socket()
            squatter.bind((ip, port))
            squatter.listen()
            squatters.append(squatter)
        return args

    monkeypatch.setattr(local, "_node_ports", taken_port)
    return squatters


def test_a_node_whose_port_is_taken_keeps_rays_logs_and_stops_the_rest(tmp_path, monkeypatch):
    """Every start of the worker finds its port taken: the raylet never registers, the start
    fails after its waits naming the logs, Ray's own logs are kept, and no node of it is
    left."""
    import cluster.local as local

    squatters = _squatting(local, monkeypatch, starts=local._NODE_ATTEMPTS)
    try:
        with pytest.raises(TimeoutError) as failure:
            start_local_cluster(tmp_path, head_ip=HEAD, worker_ips=(WORKER,), timeout_s=15)
    finally:
        for squatter in squatters:
            squatter.close()
    assert len(squatters) == local._NODE_ATTEMPTS
    message = str(failure.value)
    assert WORKER in message and str(tmp_path / "ray-logs") in message
    kept = {p.name for p in (tmp_path / "ray-logs").iterdir()}
    assert any(name.startswith("gcs_server") for name in kept), kept
    assert any(name.startswith("raylet") for name in kept), kept
    assert (tmp_path / "ray-head.log").exists() and (tmp_path / f"ray-worker-{WORKER}.log").exists()
    assert not _running_with(f"--node-ip-address={HEAD}")
    assert not _running_with(f"--node-ip-address={WORKER}")


def test_a_node_that_does_not_register_is_started_again_on_other_ports(tmp_path, monkeypatch):
    """Only the first start finds its port taken: the node is stopped, started on a fresh
    block and joins; its log says so, and stopping the cluster leaves nothing."""
    import cluster.local as local

    squatters = _squatting(local, monkeypatch, starts=1)
    try:
        cluster = start_local_cluster(tmp_path, head_ip=HEAD, worker_ips=(WORKER,),
                                      timeout_s=30)
        taken = squatters[0].getsockname()[1]
    finally:
        for squatter in squatters:
            squatter.close()
    try:
        worker = next(n for n in cluster.nodes if not n.head)
        assert len(cluster.nodes) == 2 and alive(worker.pid)
        assert f"--node-manager-port={taken}" not in worker.args
        assert "starting it again on other ports" in Path(worker.log).read_text()
    finally:
        local.stop_local_cluster(cluster)
    assert not _running_with(f"--node-ip-address={WORKER}")
