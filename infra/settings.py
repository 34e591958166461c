"""One settings object for the whole stack (env prefix ``RECSQUEEZE_``).

This module imports nothing of the project: it is the floor every other package stands on.
Secrets (the S3 keys) are ``SecretStr`` so they never show up in reprs, logs or artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_FROM_FILE = {"access_key": "s3_access_key", "secret_key": "s3_secret_key",
              "signing_key": "signing_key"}


class Settings(BaseSettings):
    """Where the S3 store, the Prefect API and the Ray cluster live."""

    model_config = SettingsConfigDict(env_prefix="RECSQUEEZE_", extra="ignore", frozen=True)

    state_dir: Path = Field(Path(".recsqueeze"), description="Local stack state (pids, keys, data)")
    s3_endpoint: str = Field("http://127.0.0.1:8333", description="S3 endpoint URL")
    s3_bucket: str = Field("artifacts", description="Bucket holding every artifact")
    s3_region: str = Field("us-east-1", description="S3 region name")
    s3_access_key: SecretStr = Field(SecretStr(""), description="S3 access key id")
    s3_secret_key: SecretStr = Field(SecretStr(""), description="S3 secret access key")
    prefect_api_url: str = Field("", description="Prefect server API URL (…/api); required")
    ray_address: str = Field("", description="host:port of a running Ray cluster's GCS")
    ray_node_ip: str = Field("", description="IP the driver uses to join the Ray cluster")
    ray_auth_token_path: str = Field("", description="Ray token-auth file; empty = no auth")
    credentials_file: str = Field(
        "", description="JSON file (mode 0600) with access_key, secret_key and signing_key: "
                        "fills those not set otherwise, so no secret travels in an environment")
    signing_key: SecretStr = Field(
        SecretStr(""), description="HMAC key sealing cached task results; never in the bucket")

    @model_validator(mode="before")
    @classmethod
    def _read_credentials_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("credentials_file"):
            return data
        path = Path(data["credentials_file"])
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            # not a ValueError: pydantic would print the input (with its secrets) in the error
            raise CredentialsError(f"credentials_file {path}: cannot read it ({exc}); point "
                             "RECSQUEEZE_CREDENTIALS_FILE at a JSON file with access_key, "
                             "secret_key and signing_key") from None
        missing = {field: raw[key] for key, field in _FROM_FILE.items()
                   if key in raw and not _given(data.get(field))}
        return data | missing

    def public_env(self) -> dict[str, str]:
        """What a worker needs to find the store, without any secret: the keys come from the
        node itself (its credentials file, its environment, a pod's Secret)."""
        env = {"RECSQUEEZE_S3_ENDPOINT": self.s3_endpoint, "RECSQUEEZE_S3_BUCKET": self.s3_bucket,
               "RECSQUEEZE_S3_REGION": self.s3_region}
        if self.credentials_file:
            env["RECSQUEEZE_CREDENTIALS_FILE"] = self.credentials_file
        return env

    def worker_env(self) -> dict[str, str]:
        """What travels to every Ray worker (the runtime_env): where the store is, and nothing
        of this host's: no key, and no path of its credentials file (a node on another host
        has its own, or its keys in its environment)."""
        return {k: v for k, v in self.public_env().items() if k != "RECSQUEEZE_CREDENTIALS_FILE"}

    def s3_env(self) -> dict[str, str]:
        """`public_env` plus the keys themselves, for this process's own environment only
        (never a runtime_env, a block or a log)."""
        return self.public_env() | {
            "RECSQUEEZE_S3_ACCESS_KEY": self.s3_access_key.get_secret_value(),
            "RECSQUEEZE_S3_SECRET_KEY": self.s3_secret_key.get_secret_value(),
            "RECSQUEEZE_SIGNING_KEY": self.signing_key.get_secret_value(),
        }


class CredentialsError(RuntimeError):
    """The credentials file cannot be read."""


def _given(value: Any) -> bool:
    return bool(value.get_secret_value() if isinstance(value, SecretStr) else value)


QUIET_ENV = {
    # Telemetry off and everything local: the stack must talk only to 127.0.0.0/8.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_EC2_METADATA_DISABLED": "true",
    "DO_NOT_TRACK": "1",
}


CLIENT_ENV = {
    # A Prefect server that restarts on its port (`recsqueeze up`) is waited for, not failed
    # on: retryable API errors are retried 6 times with 2^n s backoff (about 2 minutes) ...
    "PREFECT_CLIENT_MAX_RETRIES": "6",
    # ... and a Ray worker's fresh client does not fail a stage on its first call, the version
    # check, while the server is away (that one call is never retried); the stack runs one
    # Prefect version everywhere
    "PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED": "false",
    # flow runs beat every 30 s: a run whose process died is marked Crashed by the automation
    # the stack installs (infra.prefect_server.crash_silent_runs), never left RUNNING
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
}
