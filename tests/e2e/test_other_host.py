"""A Ray worker node on another host: nothing may depend on loopback or a shared scratch dir.

The node runs in a network namespace of its own, joined to this one by a veth pair with
addresses from the benchmarking range 198.18.0.0/15 (never a real network's) and no default
route, and in a mount namespace with a private /tmp: it reaches the Ray head, S3 and Prefect
only over that link, and sees none of this host's scratch files. The stack it joins listens on
the host-side veth address (S3, Prefect, the Ray head with no CPUs of its own, so every task
runs on that node). The flow, started by the CLI as a user would, trains, compresses and
promotes there. At the end the namespace goes, and with it the veth pair and its addresses.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.local import _wait_nodes, ray_env
from flows.stack import Stack, start_stack, stop_stack
from infra.process import alive, stop
from infra.s3server import credentials_path
from infra.settings import CLIENT_ENV, QUIET_ENV
from tests.stack_helpers import own_env as _own_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
RECSQUEEZE = str(Path(sys.executable).with_name("recsqueeze"))
RAY = str(Path(sys.executable).with_name("ray"))
REQUEST = {
    "model_name": "far-ranker",
    "dataset": {"builtin": "tiny"},
    "train": {"epochs": 1, "batch_size": 512},
    "resources": {"timing_seconds": 3},
    "require_useful_baseline": False,
    "search": None,
    "candidates": [
        {"id": "int8-all", "plan": [{"kind": "quantize", "linear": "int8_weight_only",
                                     "embeddings": "rowwise_int8"}]},
        {"id": "pruned", "plan": [{"kind": "prune", "method": "structured", "sparsity": 0.5,
                                   "finetune_epochs": 0}]}],
}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def link() -> Iterator[dict[str, str]]:
    """The namespace and its veth pair: 198.18.N.1 here, 198.18.N.2 there."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("needs root, iproute2's ip and util-linux's unshare (network and mount "
                    "namespaces)")
    tag = secrets.token_hex(3)
    octet = secrets.randbelow(250) + 2
    net = {"ns": f"rsq{tag}", "host_if": f"rsqh{tag}", "node_if": f"rsqn{tag}",
           "host_ip": f"198.18.{octet}.1", "node_ip": f"198.18.{octet}.2", "tag": tag}
    _ip("netns", "add", net["ns"])
    try:
        _ip("link", "add", net["host_if"], "type", "veth", "peer", "name", net["node_if"])
        _ip("link", "set", net["node_if"], "netns", net["ns"])
        _ip("addr", "add", f"{net['host_ip']}/30", "dev", net["host_if"])
        _ip("link", "set", net["host_if"], "up")
        for args in (("addr", "add", f"{net['node_ip']}/30", "dev", net["node_if"]),
                     ("link", "set", net["node_if"], "up"), ("link", "set", "lo", "up")):
            _ip("netns", "exec", net["ns"], "ip", *args)
        yield net
    finally:
        subprocess.run(["ip", "netns", "del", net["ns"]], capture_output=True, timeout=30)
        # the veth pair (and both addresses) went with the namespace
        assert subprocess.run(["ip", "link", "show", net["host_if"]],
                              capture_output=True).returncode != 0
        assert net["ns"] not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                               text=True).stdout


def _start_far_node(stack: Stack, net: dict[str, str], log: Path) -> int:
    """`ray start` inside the namespace, with a private /tmp; its token and S3 keys reach it
    on stdin and in its own environment (never through a file this host shares)."""
    keep = f"/run/rsq-keep-{net['tag']}"
    repo = str(REPO)
    under_tmp = repo.startswith("/tmp/")
    base = 20000 + secrets.randbelow(30000)
    ports = [f"--node-manager-port={base}", f"--object-manager-port={base + 1}",
             f"--metrics-export-port={base + 2}", f"--dashboard-agent-listen-port={base + 3}",
             f"--dashboard-agent-grpc-port={base + 4}", f"--runtime-env-agent-port={base + 5}",
             f"--min-worker-port={base + 10}", f"--max-worker-port={base + 60}"]
    ray = " ".join([RAY, "start", f"--address={stack.ray.address}",
                    f"--node-ip-address={net['node_ip']}", "--num-cpus=1", "--num-gpus=0",
                    f"--object-store-memory={256 * 1024**2}", "--disable-usage-stats",
                    "--block", *ports])
    script = "set -e\n" + (
        # the checkout (and its .venv) lies under /tmp: carry it over the private /tmp
        f"mkdir -p {keep} && mount --bind {repo} {keep}\n" if under_tmp else "") + \
        "mount -t tmpfs -o mode=1777 tmpfs /tmp\n" + (
        f"mkdir -p {repo} && mount --move {keep} {repo}\n" if under_tmp else "") + \
        "umask 077\ncat > /tmp/ray-token\n" + f"exec {ray}\n"
    keys = json.loads(credentials_path(Path(stack.state_dir)).read_text())
    env = _own_env() | QUIET_ENV | CLIENT_ENV | ray_env("/tmp/ray-token") | {
        "RECSQUEEZE_S3_ENDPOINT": stack.s3.endpoint, "RECSQUEEZE_S3_BUCKET": stack.s3.bucket,
        "RECSQUEEZE_S3_ACCESS_KEY": keys["access_key"],
        "RECSQUEEZE_S3_SECRET_KEY": keys["secret_key"],
        "RECSQUEEZE_SIGNING_KEY": keys["signing_key"]}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", net["ns"], "unshare", "--mount", "--propagation", "private",
             "sh", "-c", script], env=env, stdin=subprocess.PIPE, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
    assert proc.stdin is not None
    proc.stdin.write(Path(stack.ray.token_path).read_bytes())
    proc.stdin.close()
    return proc.pid


@pytest.fixture(scope="module")
def far(link, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, int]]:
    state = Path(tmp_path_factory.mktemp("far"))
    stack = start_stack(state, head_ip=link["host_ip"], worker_ips=(), head_cpus=0,
                        service_ip=link["host_ip"], serve_deployments=False, env=_own_env())
    node = None
    try:
        node = _start_far_node(stack, link, state / "ray-far-node.log")
        env = _own_env() | ray_env(stack.ray.token_path)
        _wait_nodes(stack.ray.address, {link["host_ip"], link["node_ip"]}, env, 180)
        yield stack, node
    finally:
        if node is not None:
            stop(node)
        stop_stack(stack)
        assert not [p for p in stack.pids() if alive(p)]


def _peers(ns: str) -> set[tuple[str, str]]:
    """(local, remote) addresses of every TCP connection in the namespace `ns` (the far node
    is all that runs there), from iproute2's `ss`."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htn"], capture_output=True,
                         text=True, timeout=30).stdout
    def host(field: str) -> str:  # "[::ffff:198.18.1.2]:port" -> "198.18.1.2"
        return field.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")

    peers = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 5:
            peers.add((host(fields[3]), host(fields[4])))
    return peers


def test_the_flow_runs_every_stage_on_the_far_node_and_promotes(far, link, tmp_path):
    stack, node = far
    request = tmp_path / "request.json"
    request.write_text(json.dumps(REQUEST))
    run = subprocess.Popen([RECSQUEEZE, "run", "--request", str(request), "--json", "--quiet",
                            "--state-dir", stack.state_dir], env=_own_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           stdin=subprocess.DEVNULL)
    seen: set[tuple[str, str]] = set()
    deadline = time.monotonic() + 900
    while run.poll() is None and time.monotonic() < deadline:
        seen |= _peers(link["ns"])  # what the far node talks to while it works
        time.sleep(0.5)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err[-3000:]
    report = json.loads(out)
    assert report["status"] == "promoted", report["reason"]
    rows = report["leaderboard"]
    assert rows and {r["node_ip"] for r in rows} == {link["node_ip"]}  # none on the head
    # the far node spoke to the head's services over the link (and to itself), nothing else
    assert seen, "no connection of the far node was seen"
    allowed = {link["host_ip"], link["node_ip"]}
    stray = sorted(p for p in seen if p[1] not in allowed and not p[1].startswith("127."))
    assert not stray, stray
    assert any(p[1] == link["host_ip"] for p in seen)
    route = subprocess.run(["ip", "netns", "exec", link["ns"], "ip", "route"],
                           capture_output=True, text=True, check=True).stdout
    assert "default" not in route, route


def test_the_far_node_shares_no_scratch_directory(far):
    """Ray gives every node the head's temp-dir path: the far node has one of that name, in
    its own /tmp. A file put in the head's, and the stack's state dir, are not there."""
    stack, node = far
    marker = Path(stack.ray.temp_dir) / f"host-only-{secrets.token_hex(4)}"
    marker.write_text("this host's scratch")
    inside = subprocess.run(
        ["nsenter", "-t", str(node), "-m", "sh", "-c",
         f"ls {stack.ray.temp_dir}; test -e {marker} && echo MARKER; "
         f"test -e {stack.state_dir} && echo STATE; true"],
        capture_output=True, text=True, timeout=30)
    assert inside.returncode == 0, inside.stderr
    assert "MARKER" not in inside.stdout and "STATE" not in inside.stdout, inside.stdout
    assert any(name.startswith("session_") for name in inside.stdout.split())  # its own
    assert not Path("/tmp/ray-token").exists()  # the token it was given stayed in there
