"""What serving takes from a registry version: its `torch.export` files, and what it is.

`version_export` returns a version's `export/` files, read back and checked against the
digests its sealed record carries; for a version promoted before exports existed (or whose
export failed then), it builds them now from the verified weights - the version itself is
immutable and is not rewritten. `version_summary` is what `recsqueeze registry show` prints.
"""

from __future__ import annotations

import json
from typing import Any

from tasks.export import AOTI, EXPORT_DIR, PROGRAM, SERVING, ExportError, export_files
from tasks.registry import Registry
from tasks.types.record import Lineage, VersionMetrics, VersionSpec


def _doc(reg: Registry, model: str, version: int, name: str, info: dict[str, Any]) -> bytes:
    body = reg.read_file(model, version, name, info)
    if body is None:
        raise ValueError(f"{model} v{version} has no {name} (its version.json does not list it)")
    return body


def version_export(reg: Registry, model: str, version: int, aoti: bool = False,
                   ) -> tuple[dict[str, bytes], str]:
    """(file name -> bytes, where they came from: "registry" or "built now") of version
    `version`'s serving export. Raises ExportError (naming the module) when the model cannot
    be exported, IntegrityError when a stored file does not match its digest."""
    info = reg.version_info(model, version)
    # only the names an export has: a record listing others (export/../x) writes nothing
    listed = [f"{EXPORT_DIR}/{n}" for n in (PROGRAM, SERVING, AOTI)
              if f"{EXPORT_DIR}/{n}" in info.get("files", {})]
    if f"{EXPORT_DIR}/{PROGRAM}" in listed and (not aoti or f"{EXPORT_DIR}/{AOTI}" in listed):
        return {n.split("/", 1)[1]: _doc(reg, model, version, n, info) for n in listed}, "registry"
    loaded, problem = reg.load_verified(model, version)
    if loaded is None:
        raise ValueError(problem)
    spec = VersionSpec.model_validate_json(_doc(reg, model, version, "spec.json", info))
    files, reason = export_files(loaded[0], loaded[1], spec.dataset_spec, aoti=aoti)
    if reason is not None:
        raise ExportError(f"{model} v{version}: {reason}")
    return {n.split("/", 1)[1]: body for n, body in files.items()}, "built now"


def _estimate(e: Any) -> dict[str, float]:
    return {"value": e.value, "ci_low": e.ci_low, "ci_high": e.ci_high}


def version_summary(reg: Registry, model: str, version: int) -> dict[str, Any]:
    """What a version is: its metrics with 95% intervals, the budget it passed, its size and
    latency ratios against the baseline, where it came from, and the URIs of its files.
    Every file read is checked against the version's digests."""
    info = reg.version_info(model, version)
    metrics = VersionMetrics.model_validate_json(_doc(reg, model, version, "metrics.json", info))
    lineage = Lineage.model_validate_json(_doc(reg, model, version, "lineage.json", info))
    m, base = metrics.metrics, metrics.baseline
    base_dir = f"registry/{model}/versions/{version}"
    uri = {name: reg.store.uri(f"{base_dir}/{name}") for name in
           ("model.safetensors", "card.md", "pareto.png", f"{EXPORT_DIR}/{PROGRAM}",
            f"{EXPORT_DIR}/{SERVING}", f"{EXPORT_DIR}/{AOTI}")
           if name == "model.safetensors" or name in info.get("files", {})}
    export_error = None
    if f"{EXPORT_DIR}/{SERVING}" in info.get("files", {}):
        serving = json.loads(_doc(reg, model, version, f"{EXPORT_DIR}/{SERVING}", info))
        export_error = serving.get("error")
    ratios = [{"batch_size": r.batch_size, "value": r.value, "ci_low": r.ci_low,
               "ci_high": r.ci_high, "device": r.device, "side_by_side": True}
              for r in metrics.latency_ratio]
    if not ratios:  # a version promoted before the ratio was recorded: from the two runs' p99s
        ratios = [{"batch_size": lat.batch_size, "value": base_p99 / lat.p99_ms,
                   "side_by_side": False} for lat in m.latency
                  if (base_p99 := base.p99_ms(lat.batch_size)) and lat.p99_ms > 0]
    return {
        "model": model, "version": version, "candidate": info["candidate"],
        "plan": [stage.label() for stage in lineage.plan], "verified": True,
        "metrics": {"main": m.main, "quality": {k: _estimate(v) for k, v in m.quality.items()},
                    "logloss": m.logloss, "rows": m.rows, "size_bytes": m.size_bytes,
                    "latency": [lat.model_dump() for lat in m.latency]},
        "deltas": [d.model_dump() for d in metrics.deltas],
        "budget": lineage.request.budget.model_dump(mode="json"),
        "ratios": {"size": base.size_bytes / m.size_bytes if m.size_bytes else None,
                   "latency_p99": ratios},
        "baseline": {"main": base.value(), "size_bytes": base.size_bytes},
        "lineage": {"run_id": lineage.run_id, "code_git_sha": lineage.code_git_sha,
                    "dataset_uri": lineage.dataset.get("uri"),
                    "dataset_sha256": lineage.dataset.get("sha256"), "seeds": lineage.seeds,
                    "ray_node": lineage.ray_node, "wall_s": lineage.wall_s,
                    "chain": [{k: c.get(k) for k in ("stage", "ray_node", "wall_s", "device")}
                              for c in lineage.chain]},
        "uris": uri, "files": info.get("files", {}), "export_error": export_error,
    }
