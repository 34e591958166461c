"""One settings object for the whole stack (env prefix ``RECSQUEEZE_``).

This module imports nothing of the project: it is the floor every other package stands on.
Secrets (the S3 keys) are ``SecretStr`` so they never show up in reprs, logs or artifacts.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


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

    def s3_env(self) -> dict[str, str]:
        """The RECSQUEEZE_S3_* variables a remote worker needs to reach the store."""
        return {
            "RECSQUEEZE_S3_ENDPOINT": self.s3_endpoint,
            "RECSQUEEZE_S3_BUCKET": self.s3_bucket,
            "RECSQUEEZE_S3_REGION": self.s3_region,
            "RECSQUEEZE_S3_ACCESS_KEY": self.s3_access_key.get_secret_value(),
            "RECSQUEEZE_S3_SECRET_KEY": self.s3_secret_key.get_secret_value(),
        }


QUIET_ENV = {
    # Telemetry off and everything local: the stack must talk only to 127.0.0.0/8.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_EC2_METADATA_DISABLED": "true",
    "DO_NOT_TRACK": "1",
}

