"""What a run records, built once for every executor: the gate report, the registry version
record of a promoted candidate, and the run's files in the store."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.artifacts import BlobStore
from tasks.cache import git_sha, installed_digest
from tasks.execute import Executed
from tasks.gate import Verdict
from tasks.report import leaderboard, markdown, model_card, pareto_png
from tasks.search_report import search_markdown, search_png
from tasks.types import GateReport
from tasks.types.record import Lineage, VersionMetrics, VersionRecord, VersionSpec


def gate_report(run_id: str, executed: Executed, verdict: Verdict | None) -> GateReport:
    """The report of a run: the leaderboard the gate's verdict sorts, or - without a verdict
    (`executed.stop`) - why it ended before compression."""
    r, base = executed.graph.request, executed.evaluation
    rows = leaderboard(base.metrics, executed.results, verdict) if verdict else ()
    if verdict is None:
        status, reason = "stopped", executed.stop or ""
    else:
        status, reason = "not_promoted", verdict.reason
    return GateReport(
        run_id=run_id, model_name=r.model_name, dataset=executed.dataset,
        baseline=base.metrics, leaderboard=rows, chosen=verdict.chosen if verdict else None,
        promoted=None, status=status, reason=reason,  # type: ignore[arg-type]
        failures=executed.failures, skipped=executed.skipped, trivial=base.trivial,
        resolution=base.resolution, warnings=executed.warnings, search=executed.search)


def version_record(report: GateReport, executed: Executed, candidate: str) -> VersionRecord:
    """Everything the registry version of `candidate` holds besides its weights."""
    r, base = executed.graph.request, executed.evaluation
    chosen = next(x for x in executed.results if x.candidate.id == candidate)
    row = next(x for x in report.leaderboard if x.candidate == candidate)
    chain = [executed.baseline, *executed.models.get(candidate, [])]
    return VersionRecord(
        spec=VersionSpec(candidate=chosen.candidate, dataset_spec=executed.dataset.spec),
        metrics=VersionMetrics(metrics=chosen.metrics, deltas=chosen.deltas,
                               baseline=base.metrics, latency_ratio=chosen.latency_ratio),
        lineage=Lineage(
            run_id=report.run_id, code_git_sha=git_sha(), code_digest=installed_digest(),
            dataset={"uri": executed.dataset.uri, "sha256": executed.dataset.sha256},
            request=r, plan=chosen.candidate.plan,
            seeds={"train": r.train.seed, "data": r.dataset.seed},
            parent=executed.baseline.model, ray_node=chosen.node_ip, wall_s=chosen.wall_s,
            chain=tuple(b.lineage() for b in chain), metrics=chosen.metrics,
            deltas=chosen.deltas, baseline_source=executed.graph.imported),
        card=model_card(report, row), plot=pareto_png(report))


def write_report(store: BlobStore, report: GateReport) -> tuple[str, bytes | None]:
    """The run's files under runs/RUN_ID/: leaderboard (Parquet), report.json, the Pareto plot
    and report.md. Returns the markdown and the plot (for the UI's artifacts). No presigned
    link anywhere persistent (it carries the access key id and a signature): the report links
    the plot relative to its folder."""
    rows = [row.model_dump(mode="json") for row in report.leaderboard]
    base = f"runs/{report.run_id}"
    png = None
    if rows:
        table = pa.Table.from_pylist([{**r, "reasons": "; ".join(r["reasons"])} for r in rows])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        store.put_bytes(f"{base}/leaderboard.parquet", sink.getvalue().to_pybytes(),
                        "application/vnd.apache.parquet")
    store.put_json(f"{base}/report.json", report.model_dump(mode="json"))
    text = markdown(report)
    if rows:
        png = pareto_png(report)
        store.put_bytes(f"{base}/pareto.png", png, "image/png")
        text += (f"\n![size vs {report.baseline.main}, Pareto front](pareto.png)\n\n"
                 f"(`{store.uri(base + '/pareto.png')}`)\n")
    if report.search is not None:
        text += "\n" + search_markdown(report.search)
        search_plot = search_png(report.search)
        if search_plot is not None:
            store.put_bytes(f"{base}/search.png", search_plot, "image/png")
            text += "\n![recipe search: size vs valid loss](search.png)\n"
    store.put_text(f"{base}/report.md", text)
    return text, png
