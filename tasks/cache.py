"""The result cache's keys: content only (the plan node, the bytes it reads, the code).

A cached task's key is the sha256 of
- its plan node's key (`tasks.plan`: the configs from the request down to this node),
- the sha256 of every artifact its inputs refer to (models, datasets, tables: what it reads,
  not where it was built or how long that took), and
- `source_digest()`: the code of every recsqueeze package, so a result written by older code
  (a model trained by an older loop) is never served to newer code.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

from infra.settings import Settings
from tasks.results import JSONResults, ResultJSON

PACKAGES = ("tasks", "flows", "infra", "cluster")
ROOT = Path(__file__).resolve().parent.parent


@cache
def installed_digest() -> str:
    """`source_digest` of the installed code (computed once per process)."""
    return source_digest(ROOT)


def source_digest(root: Path) -> str:
    """sha256 over the path and bytes of every .py file of `PACKAGES` under `root`."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def git_sha() -> str:
    """The checkout's commit (lineage records), or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=ROOT, timeout=5)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def artifact_digests(value: Any) -> list[str]:
    """Every `sha256` field of `value`, at any depth, in order: the content an input names."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        own = [value["sha256"]] if isinstance(value.get("sha256"), str) else []
        return own + [d for k, v in value.items() if k != "sha256" for d in artifact_digests(v)]
    if isinstance(value, (list, tuple)):
        return [d for v in value for d in artifact_digests(v)]
    return []


def cache_key(node: str, inputs: dict[str, Any]) -> str:
    blob = json.dumps([node, installed_digest(), artifact_digests(dict(sorted(inputs.items())))])
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class NodeKey(CachePolicy):
    """Prefect cache policy: `cache_key` of one plan node."""

    node: str = ""

    def compute_key(self, task_ctx: Any, inputs: Any, flow_parameters: Any,
                    **kwargs: Any) -> str:
        return cache_key(self.node, inputs or {})


def result_storage(settings: Settings) -> JSONResults:
    """Prefect task results in the artifact bucket (prefect-results/), as JSON of known types
    only (tasks.results). Prefect wants the storage saved server-side: the block holds no keys
    (each process uses its own settings), so nothing secret is in the server's block store."""
    block = JSONResults()
    block.save("recsqueeze-results", overwrite=True)
    return block


def cached(task_: Any, storage: object, refresh: bool, node: str) -> Any:
    """`task_` with its result persisted to S3 and cached under plan node `node`'s content key
    (`cache_key`): a later call on the same content and code -- in this run or any other -- is
    served from the cache (state Cached). `refresh` recomputes and overwrites the entry.
    Results are stored as JSON of known types, and a record that is not one reads as a miss
    (tasks.results): nothing read back from the bucket runs."""
    return task_.with_options(cache_policy=NodeKey(node=node), persist_result=True,
                              result_storage=storage, result_serializer=ResultJSON(),
                              refresh_cache=refresh)
