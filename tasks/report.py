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
        main = deltas[r.metrics.main]
        ratio = next((x for x in r.latency_ratio if x.batch_size == LATENCY_BS), None)
        rows.append(LeaderboardRow(
            candidate=r.candidate.id, plan=r.candidate.label(), size_bytes=r.metrics.size_bytes,
            size_ratio=baseline.size_bytes / r.metrics.size_bytes, metric=r.metrics.main,
            quality=r.metrics.value(), delta=main.delta, loss_ci_high=main.loss_ci_high,
            logloss_delta=deltas["logloss"].delta if "logloss" in deltas else None,
            p99_ms_bs512=p99,
            latency_ratio=ratio.value if ratio else (base_p99 / p99) if (base_p99 and p99)
            else None,
            latency_ratio_low=ratio.ci_low if ratio else None,
            latency_ratio_high=ratio.ci_high if ratio else None,
            latency_device=ratio.device if ratio else None,
            passed=decisions[r.candidate.id].passed, reasons=decisions[r.candidate.id].reasons,
            node_ip=r.node_ip,
        ))
    return tuple(sorted(rows, key=lambda row: (not row.passed, row.size_bytes)))


def _table(rows: tuple[LeaderboardRow, ...], metric: str) -> str:
    lines = [f"| candidate | plan | size (bytes) | size ratio | {metric} | delta | loss CI high "
             "| p99 ms @512 | latency ratio | passed | node |", "|" + "---|" * 11]
    for r in rows:
        lat = f"{r.latency_ratio:.2f}x" if r.latency_ratio else "-"
        if r.latency_ratio and r.latency_ratio_low is not None:
            lat += f" [{r.latency_ratio_low:.2f}, {r.latency_ratio_high:.2f}]"
        p99 = f"{r.p99_ms_bs512:.3f}" if r.p99_ms_bs512 else "-"
        lines.append(f"| {r.candidate} | {r.plan} | {r.size_bytes} | {r.size_ratio:.2f}x | "
                     f"{r.quality:.5f} | {r.delta:+.5f} | {r.loss_ci_high:.5f} | {p99} | "
                     f"{lat} | {'yes' if r.passed else 'no: ' + '; '.join(r.reasons)} | "
                     f"{r.node_ip} |")
    return "\n".join(lines)


def markdown(report: GateReport) -> str:
    b = report.baseline
    bayes = report.dataset.spec.bayes_auc
    promoted = (f"**Promoted** `{report.promoted.uri}` (v{report.promoted.version})"
                if report.promoted else f"**{'Stopped' if report.status == 'stopped' else 'Not promoted'}**: "
                f"{report.reason}")
    failures = "".join(f"\n- `{c}` failed: {e}" for c, e in report.failures.items()) + "".join(
        f"\n- `{c}` skipped: {e}" for c, e in report.skipped.items())
    return (
        f"# recsqueeze run {report.run_id}\n\nModel `{report.model_name}` on "
        f"`{report.dataset.uri}` ({report.dataset.rows['test']} test rows)\n\n"
        f"Baseline: {baseline_line(b)}"
        + (f"; Bayes-optimal AUC of the generator {bayes:.5f}" if bayes and b.main == "auc"
           else "")
        + f"\n\n{checks(report)}\n\n{_table(report.leaderboard, b.main)}\n\n"
        + "".join(f"{line}\n\n" for line in timed_on(report.leaderboard))
        + f"{promoted}{failures}\n"
    )


def timed_on(rows: tuple[LeaderboardRow, ...]) -> list[str]:
    """Where the latencies were measured: one line per device (the serving device; a
    candidate that could not run there was timed on CPU, and its line names it)."""
    devices: dict[str, list[str]] = {}
    for r in rows:
        if r.latency_device:
            devices.setdefault(r.latency_device, []).append(r.candidate)
    if len(devices) == 1:
        return [f"Latency (p99, ratio) timed side by side with the baseline on {next(iter(devices))}"]
    return [f"Latency of {', '.join(c)} timed side by side with the baseline on {d}"
            for d, c in devices.items()]


def checks(report: GateReport) -> str:
    """The baseline against its trivial predictors, and each budget's resolution."""
    lines = [f"- vs trivial `{t.name}`: {t.metric} {t.value:.5f}, baseline margin "
             f"{t.margin:+.5f} (lower bound {t.margin_low:+.5f})" for t in report.trivial]
    lines += [f"- budget `{r.metric}`: allows a loss of {r.budget:.5f}; this test split "
              f"resolves {r.resolution:.5f} ({r.relative_resolution:.3%}) - "
              + ("ok" if r.resolvable else f"**too coarse**, ~{r.rows_needed or '?'} test rows "
                 "needed") for r in report.resolution]
    return "\n".join(lines + [f"- **warning**: {w}" for w in report.warnings])


def baseline_line(b: Metrics) -> str:
    """The baseline's main metric with its interval, logloss (ranking) and size."""
    q = b.quality[b.main]
    return (f"{b.main} {q.value:.5f} [{q.ci_low:.5f}, {q.ci_high:.5f}]"
            + (f", logloss {b.logloss:.5f}" if b.logloss is not None else "")
            + f", {b.size_bytes} bytes")


def pareto_front(rows: tuple[LeaderboardRow, ...]) -> list[LeaderboardRow]:
    """Candidates no other candidate beats on both size and quality (smaller and better)."""
    return [r for r in rows if not any(
        o.size_bytes <= r.size_bytes and o.quality >= r.quality and (o.size_bytes, o.quality)
        != (r.size_bytes, r.quality) for o in rows)]


def pareto_png(report: GateReport) -> bytes:
    """Size ratio (log) vs the main metric's delta of every candidate; passing ones filled,
    the Pareto front joined."""
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
            ax.scatter([r.size_ratio for r in sel], [r.delta for r in sel], s=40, **style)
    front = sorted(pareto_front(rows), key=lambda r: r.size_ratio)
    if front:
        ax.plot([r.size_ratio for r in front], [r.delta for r in front], "k--", lw=1,
                label="Pareto front")
    for r in rows:
        ax.annotate(r.candidate, (r.size_ratio, r.delta), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("size ratio (baseline bytes / candidate bytes)")
    metric = rows[0].metric if rows else "quality"
    ax.set_ylabel(f"{metric} delta vs baseline (paired, same rows)")
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
        f"| {row.metric} (test) | {row.quality:.5f} |\n"
        f"| {row.metric} delta vs baseline | {row.delta:+.5f} |\n"
        f"| {row.metric} loss, upper 95% bound | {row.loss_ci_high:.5f} |\n"
        + (f"| logloss delta | {row.logloss_delta:+.5f} |\n" if row.logloss_delta is not None
           else "") + f"| size | {row.size_bytes} bytes "
        f"({row.size_ratio:.2f}x smaller) |\n| p99 latency @512 | {row.p99_ms_bs512} ms |\n"
        f"\n![size vs {row.metric} of every candidate of the run](pareto.png)\n"
    )
