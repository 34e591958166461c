"""Leaderboard rows, the markdown report and the model card (pure formatting)."""

from __future__ import annotations

from tasks.gate import Verdict
from tasks.types import CandidateResult, GateReport, LeaderboardRow, Metrics

LATENCY_BS = 512


def leaderboard(baseline: Metrics, results: list[CandidateResult],
                verdict: Verdict) -> tuple[LeaderboardRow, ...]:
    decisions = {d.candidate_id: d for d in verdict.decisions}
    rows = []
    for r in results:
        deltas = {d.metric: d for d in r.deltas}
        p99 = r.metrics.p99_ms(LATENCY_BS)
        # the baseline timed side by side with this candidate, not in another task
        base_p99 = next((lat.p99_ms for lat in r.baseline_latency
                         if lat.batch_size == LATENCY_BS), None)
        rows.append(LeaderboardRow(
            candidate=r.candidate.id, plan=r.candidate.label(), size_bytes=r.metrics.size_bytes,
            size_ratio=baseline.size_bytes / r.metrics.size_bytes, auc=r.metrics.auc.value,
            auc_delta=deltas["auc"].delta, auc_loss_ci_high=deltas["auc"].loss_ci_high,
            logloss_delta=deltas["logloss"].delta, p99_ms_bs512=p99,
            latency_ratio=(base_p99 / p99) if (base_p99 and p99) else None,
            passed=decisions[r.candidate.id].passed, reasons=decisions[r.candidate.id].reasons,
            node_ip=r.node_ip,
        ))
    return tuple(sorted(rows, key=lambda row: (not row.passed, row.size_bytes)))


def _table(rows: tuple[LeaderboardRow, ...]) -> str:
    lines = ["| candidate | plan | size (bytes) | size ratio | AUC | AUC delta | AUC loss CI high "
             "| p99 ms @512 | latency ratio | passed | node |", "|" + "---|" * 11]
    for r in rows:
        lat = f"{r.latency_ratio:.2f}x" if r.latency_ratio else "-"
        p99 = f"{r.p99_ms_bs512:.3f}" if r.p99_ms_bs512 else "-"
        lines.append(f"| {r.candidate} | {r.plan} | {r.size_bytes} | {r.size_ratio:.2f}x | "
                     f"{r.auc:.5f} | {r.auc_delta:+.5f} | {r.auc_loss_ci_high:.5f} | {p99} | "
                     f"{lat} | {'yes' if r.passed else 'no: ' + '; '.join(r.reasons)} | "
                     f"{r.node_ip} |")
    return "\n".join(lines)


def markdown(report: GateReport) -> str:
    b = report.baseline
    bayes = report.dataset.spec.bayes_auc
    promoted = (f"**Promoted** `{report.promoted.uri}` (v{report.promoted.version})"
                if report.promoted else f"**Not promoted**: {report.reason}")
    failures = "".join(f"\n- `{c}` failed: {e}" for c, e in report.failures.items()) + "".join(
        f"\n- `{c}` skipped: {e}" for c, e in report.skipped.items())
    return (
        f"# recsqueeze run {report.run_id}\n\nModel `{report.model_name}` on "
        f"`{report.dataset.uri}` ({report.dataset.rows['test']} test rows)\n\n"
        f"Baseline: AUC {b.auc.value:.5f} [{b.auc.ci_low:.5f}, {b.auc.ci_high:.5f}], "
        f"logloss {b.logloss:.5f}, {b.size_bytes} bytes"
        + (f"; Bayes-optimal AUC of the generator {bayes:.5f}" if bayes else "")
        + f"\n\n{_table(report.leaderboard)}\n\n{promoted}{failures}\n"
    )


def pareto_front(rows: tuple[LeaderboardRow, ...]) -> list[LeaderboardRow]:
    """Candidates no other candidate beats on both size and AUC (smaller and better)."""
    return [r for r in rows if not any(
        o.size_bytes <= r.size_bytes and o.auc >= r.auc and (o.size_bytes, o.auc) != (
            r.size_bytes, r.auc) for o in rows)]


def pareto_png(report: GateReport) -> bytes:
    """Size ratio (log) vs AUC delta of every candidate; passing ones filled, the Pareto front
    joined, the AUC budget drawn where it is one number."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = report.leaderboard
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for passed, style in ((True, dict(c="tab:green", label="passed")),
                          (False, dict(facecolors="none", edgecolors="tab:red", label="failed"))):
        sel = [r for r in rows if r.passed is passed]
        if sel:
            ax.scatter([r.size_ratio for r in sel], [r.auc_delta for r in sel], s=40, **style)
    front = sorted(pareto_front(rows), key=lambda r: r.size_ratio)
    if front:
        ax.plot([r.size_ratio for r in front], [r.auc_delta for r in front], "k--", lw=1,
                label="Pareto front")
    for r in rows:
        ax.annotate(r.candidate, (r.size_ratio, r.auc_delta), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("size ratio (baseline bytes / candidate bytes)")
    ax.set_ylabel("AUC delta vs baseline (paired, same rows)")
    ax.set_title(f"{report.model_name} — run {report.run_id[:8]}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def model_card(report: GateReport, row: LeaderboardRow) -> str:
    return (
        f"# {report.model_name}: candidate `{row.candidate}`\n\n"
        f"Plan: {row.plan}\n\nTrained and compressed by run {report.run_id} on "
        f"`{report.dataset.uri}` (sha256 {report.dataset.sha256}).\n\n"
        "| metric | value |\n|---|---|\n"
        f"| AUC (test) | {row.auc:.5f} |\n| AUC delta vs baseline | {row.auc_delta:+.5f} |\n"
        f"| AUC loss, upper 95% bound | {row.auc_loss_ci_high:.5f} |\n"
        f"| logloss delta | {row.logloss_delta:+.5f} |\n| size | {row.size_bytes} bytes "
        f"({row.size_ratio:.2f}x smaller) |\n| p99 latency @512 | {row.p99_ms_bs512} ms |\n"
        "\n![size vs AUC of every candidate of the run](pareto.png)\n"
    )
