"""SeaweedFS back on its S3 port after a kill, even when another loopback address took one of
its internal ports meanwhile (`weed mini` refuses a flag's port that is busy on any address:
a CI run's restart failed on a Ray worker's port); a taken S3 port is named."""

from __future__ import annotations

import os
import signal
import socket
import time

import boto3
import pytest

from infra.process import PortTaken, alive
from infra.s3server import restart_s3, start_s3

ELSEWHERE = "127.0.0.52"  # another loopback address; no stack of the suite uses it


def _listening(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ELSEWHERE, port))
    sock.listen()
    return sock


def _kill(pid: int) -> None:
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_restart_moves_a_taken_internal_port_and_keeps_the_s3_port_and_data(tmp_path):
    server = start_s3(tmp_path, bucket="restart")
    client = lambda s: boto3.client(  # noqa: E731
        "s3", endpoint_url=s.endpoint, aws_access_key_id=s.access_key,
        aws_secret_access_key=s.secret_key, region_name="us-east-1")
    client(server).put_object(Bucket="restart", Key="k", Body=b"kept")
    _kill(server.pid)
    squatter = _listening(server.ports["admin"])
    again = None
    try:
        again = restart_s3(tmp_path, server)
        assert again.endpoint == server.endpoint
        assert again.ports["admin"] != server.ports["admin"]
        assert {k: v for k, v in again.ports.items() if k != "admin"} == \
            {k: v for k, v in server.ports.items() if k != "admin"}
        assert client(again).get_object(Bucket="restart", Key="k")["Body"].read() == b"kept"
        _kill(again.pid)
        squatter.close()
        squatter = _listening(server.ports["s3"])
        with pytest.raises(PortTaken, match=f"S3 port {server.ports['s3']} .* is taken"):
            restart_s3(tmp_path, again)
    finally:
        squatter.close()
        for s in (server, again):
            if s is not None and alive(s.pid):
                _kill(s.pid)
