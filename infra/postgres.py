"""A local PostgreSQL for the Prefect server (`recsqueeze up --db postgres`): what a platform
team runs Prefect on, here on loopback.

Debian's `postgresql` package provides the binaries (`make postgres` installs it where
missing). The cluster lives under STATE/postgres (its own data dir), listens on 127.0.0.1 only
(TCP, and a Unix socket inside that dir), and has one role, `prefect`, whose password is
generated once and kept in STATE/postgres.password (mode 0600): it reaches the Prefect server
in that process's environment (PREFECT_API_DATABASE_CONNECTION_URL), never in a log, stack.json
or a URL of an artifact. PostgreSQL refuses to run as root: as root, the data dir belongs to
the package's `postgres` user and the server runs as that user.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from infra.process import PortTaken, alive, free_port, port_free, spawn

DATABASE = "prefect"
ROLE = "prefect"


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    pid: int

    def url(self, state_dir: Path) -> str:
        """The asyncpg connection URL, password included: for the Prefect server's
        environment only."""
        return (f"postgresql+asyncpg://{ROLE}:{password(state_dir)}@{self.host}:{self.port}/"
                f"{DATABASE}")


def bin_dir() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if found:
        return found[-1].parent
    which = shutil.which("postgres") or shutil.which("initdb")
    if which and (Path(which).resolve().parent / "postgres").exists():
        return Path(which).resolve().parent
    raise PostgresMissing("PostgreSQL is not installed: `make postgres` installs Debian's "
                          "postgresql package (or install it yourself), then run again")


def password(state_dir: Path) -> str:
    """The `prefect` role's password, generated on first use (STATE/postgres.password, 0600)."""
    path = state_dir / "postgres.password"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def _owner() -> str | None:
    """Who runs the server: the `postgres` user when we are root (initdb refuses root)."""
    return "postgres" if os.geteuid() == 0 else None


def _run(args: list[str], env: dict[str, str] | None = None) -> None:
    owner = _owner()
    as_user: dict[str, object] = {"user": owner, "group": owner, "extra_groups": []} \
        if owner else {}
    done = subprocess.run(args, env=(env or {}) | {"PATH": os.environ.get("PATH", "")},
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          cwd="/", **as_user)  # type: ignore[call-overload]
    if done.returncode:
        raise RuntimeError(f"{Path(args[0]).name} failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-1500:]}")


def _traversable(path: Path) -> None:
    """Let the `postgres` user reach its data dir: every directory above it that others cannot
    enter gets o+x (enter, not list: a root-owned 0700 state or temp dir stays unreadable)."""
    for parent in (path, *path.parents):
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)


def _init(state_dir: Path, data: Path, run: Path) -> None:
    """A new cluster: the `prefect` role with its password (scram-sha-256 over TCP)."""
    pg = data.parent
    pg.mkdir(parents=True, exist_ok=True)
    run.mkdir(exist_ok=True)
    pwfile = pg / "initdb.pw"
    pwfile.write_text(password(state_dir))
    os.chmod(pwfile, 0o600)
    owner = _owner()
    if owner:
        for path in (pg, run, pwfile):
            shutil.chown(path, owner, owner)
        _traversable(pg.parent)
    try:
        _run([str(bin_dir() / "initdb"), "-D", str(data), "-U", ROLE, "--pwfile", str(pwfile),
              "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8",
              "--locale=C"])
    finally:
        pwfile.unlink(missing_ok=True)


def start_postgres(state_dir: Path, host: str = "127.0.0.1", port: int | None = None,
                   same_port: bool = False) -> PostgresServer:
    """Start the cluster under STATE/postgres (created on first use, its database too) and
    wait until it takes connections. With `same_port` (a restart) it is `port` or an error."""
    if port and not port_free(host, port):
        if same_port:
            raise PortTaken(f"PostgreSQL port {host}:{port} is taken: stop what holds it")
        port = None
    port = port or free_port(host)
    pg = (state_dir / "postgres").resolve()
    data, run = pg / "data", pg / "run"
    fresh = not (data / "PG_VERSION").exists()
    if fresh:
        _init(state_dir, data, run)
    log = state_dir / "postgres.log"
    pid = spawn([str(bin_dir() / "postgres"), "-D", str(data), "-h", host, "-p", str(port),
                 "-k", str(run), "-c", "logging_collector=off"],
                {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"}, log, cwd=Path("/"),
                user=_owner())
    server = PostgresServer(host, port, pid)
    _wait_ready(server, log)
    if fresh:
        _run([str(bin_dir() / "createdb"), "-h", host, "-p", str(port), "-U", ROLE, DATABASE],
             {"PGPASSWORD": password(state_dir)})  # the password in no argv
    return server


def _wait_ready(server: PostgresServer, log: Path, timeout_s: float = 60.0) -> None:
    isready = str(bin_dir() / "pg_isready")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(server.pid):
            raise RuntimeError(f"PostgreSQL exited at start; see {log}:\n"
                               + log.read_text(errors="replace")[-1500:])
        ok = subprocess.run([isready, "-q", "-h", server.host, "-p", str(server.port)],
                            stdin=subprocess.DEVNULL, timeout=10)
        if ok.returncode == 0:
            return
        time.sleep(0.3)
    raise TimeoutError(f"PostgreSQL not ready on {server.host}:{server.port} after "
                       f"{timeout_s:.0f}s; see {log}")


def restart_postgres(state_dir: Path, server: PostgresServer) -> PostgresServer:
    """The server that died, back on its address and data."""
    return start_postgres(state_dir, server.host, server.port, same_port=True)
