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


def test_a_node_whose_port_is_taken_keeps_rays_logs_and_stops_the_rest(tmp_path, monkeypatch):
    """The worker's node-manager port is taken by the time its raylet binds it (what an
    outgoing connection's source port did to a port block in the ephemeral range): the
    raylet never registers, the start fails after its wait naming the logs, Ray's own logs
    are kept, and no node of it is left."""
    import cluster.local as local

    squatter = socket.socket()
    chosen = local._node_ports

    def taken_port(ip: str, head: bool) -> list[str]:
        args = chosen(ip, head)
        if ip == WORKER:
            port = int(next(a for a in args if a.startswith("--node-manager-port=")
                            ).split("=")[1])
            squatter.bind((ip, port))
            squatter.listen()
        return args

    monkeypatch.setattr(local, "_node_ports", taken_port)
    try:
        with pytest.raises(TimeoutError) as failure:
            start_local_cluster(tmp_path, head_ip=HEAD, worker_ips=(WORKER,), timeout_s=30)
    finally:
        squatter.close()
    message = str(failure.value)
    assert WORKER in message and str(tmp_path / "ray-logs") in message
    kept = {p.name for p in (tmp_path / "ray-logs").iterdir()}
    assert any(name.startswith("gcs_server") for name in kept), kept
    assert any(name.startswith("raylet") for name in kept), kept
    assert (tmp_path / "ray-head.log").exists() and (tmp_path / f"ray-worker-{WORKER}.log").exists()
    assert not _running_with(f"--node-ip-address={HEAD}")
    assert not _running_with(f"--node-ip-address={WORKER}")
