"""Start, probe and stop the stack's processes (each in its own process group); free ports.

The floor module for processes and ports: it imports nothing of the project, so infra's
servers and cluster's Ray nodes share one spawn and one stop.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


class PortTaken(RuntimeError):
    """A server cannot come back on its old port (clients know that address)."""


def free_port(host: str = "127.0.0.1", also_free_offset: int = 0) -> int:
    """A free TCP port on `host`, below the kernel's ephemeral range (`free_port_block`: a
    server keeps its port across restarts, and no outgoing connection takes it meanwhile);
    with `also_free_offset`, port+offset must be free too (SeaweedFS puts each gRPC port at
    http port + 10000)."""
    return free_port_block(host, 1 + also_free_offset, set(), only=(0, also_free_offset))


def port_free(host: str, port: int) -> bool:
    """Nothing listens on host:port (connections of a server that died, in TIME_WAIT, do not
    count: the servers themselves bind with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (Linux's
    ip_local_port_range; 32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(host: str, count: int, taken: set[int],
                    only: tuple[int, ...] | None = None) -> int:
    """First port of `count` consecutive free ports on `host`, none of them in `taken`; the
    block is added to `taken` (with `only`: just those offsets of the block need be free,
    and are added). The block lies below the kernel's ephemeral range (random
    start from 10000): a port there is free when checked but may be any outgoing
    connection's source port a minute later, and a Ray node binds its worker ports for as
    long as it runs (a raylet that cannot bind never registers; `ray start` then waits)."""
    low, high = 10000, _ephemeral_low() - count
    if high <= low:  # a range configured down to the low ports: take what is above it
        low, high = 20000, 65536 - count
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(low, high)
        ports = [base + k for k in only] if only is not None else range(base, base + count)
        if not taken.intersection(ports) and all(port_free(host, p) for p in ports):
            taken.update(ports)
            return base
    raise RuntimeError(f"no block of {count} free ports on {host}")


def spawn(args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None,
          umask: int = -1, user: str | None = None) -> int:
    """Start a detached process, its output appended to `log` (own session: outlives the CLI,
    stopped as a group). `umask` (e.g. 0o077: its files are the user's alone) applies in the
    child; -1 keeps ours. `user`: run it as that user (a server that refuses root)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    as_user: dict[str, object] = {"user": user, "group": user, "extra_groups": []} if user else {}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, umask=umask,
            **as_user,  # type: ignore[call-overload]
        )
    return proc.pid


def alive(pid: int) -> bool:
    """`pid` runs (a zombie child of ours is reaped and counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as dead
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def wait_http(url: str, pid: int, log: Path, timeout_s: float = 120.0) -> None:
    """Poll `url` until it answers 2xx; fail early (with the log's tail) if `pid` dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"process {pid} exited before {url} answered; log tail:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if 200 <= resp.status < 300:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s (log: {log})")


def stop(pid: int, timeout_s: float = 20.0, term_group: bool = True) -> None:
    """SIGTERM the process group `pid` leads (only `pid` itself with `term_group=False`, for a
    leader that shuts its own children down), wait up to `timeout_s` for `pid` to exit, then
    SIGKILL what is left of the group."""
    try:
        if term_group:
            os.killpg(pid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    alive(pid)  # reap
