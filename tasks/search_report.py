"""What a recipe search reports: its trials as table rows, a markdown section, and a Pareto plot
of the valid-split scores (size vs loss, latency as colour)."""

from __future__ import annotations

import io

from tasks.types import SearchReport, TrialRecord


def trial_rows(report: SearchReport) -> list[dict[str, object]]:
    """One row per trial (the Prefect table artifact and the JSON report)."""
    rows = []
    for t in report.trials:
        v = t.validated
        rows.append({"trial": t.number, "plan": t.plan, "state": t.state,
                     "feasible": t.feasible,
                     "size_ratio": round(v.baseline_bytes / v.size_bytes, 3) if v else None,
                     "valid_relative_loss": round(v.relative_loss, 6) if v else None,
                     "p99_ratio@512": round(v.p99_ratio, 3) if v and v.p99_ratio else None,
                     "cpu_s": round(t.cpu_s, 1), "why": t.why})
    return rows


def search_markdown(report: SearchReport) -> str:
    done = [t for t in report.trials if t.state == "complete"]
    lines = [
        "## Recipe search\n",
        f"{len(report.trials)} trials ({len(done)} complete, "
        f"{sum(t.state == 'pruned' for t in report.trials)} pruned early, "
        f"{sum(t.state == 'failed' for t in report.trials)} failed; "
        f"{sum(t.feasible for t in report.trials)} within the budget on the valid split) in "
        f"{report.wall_s:.0f} s wall, {report.cpu_s:.0f} CPU s, {report.gpu_s:.0f} GPU s; "
        f"objectives {', '.join(report.objectives)}. Front sent to the gate (judged on the "
        f"test split): {', '.join(report.front) or 'none'}.\n",
        "| trial | plan | state | size | valid loss | p99 ratio @512 |", "|---|---|---|---|---|---|"]
    for row in trial_rows(report):
        lines.append(f"| {row['trial']} | {row['plan']} | {row['state']}"
                     f"{' (feasible)' if row['feasible'] else ''} | {row['size_ratio'] or ''}x | "
                     f"{row['valid_relative_loss'] if row['valid_relative_loss'] is not None else ''} | "
                     f"{row['p99_ratio@512'] or ''} |")
    return "\n".join(lines) + "\n"


def search_png(report: SearchReport) -> bytes | None:
    """Size ratio (log) vs valid-split relative loss of every scored trial; colour = p99
    ratio; feasible trials filled, the front circled."""
    scored: list[TrialRecord] = [t for t in report.trials if t.validated is not None
                                 and t.state == "complete"]
    if not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    xs = [t.validated.baseline_bytes / t.validated.size_bytes for t in scored]  # type: ignore[union-attr]
    ys = [t.validated.relative_loss for t in scored]  # type: ignore[union-attr]
    cs = [t.validated.p99_ratio or 0.0 for t in scored]  # type: ignore[union-attr]
    points = ax.scatter(xs, ys, c=cs, cmap="viridis", s=[50 if t.feasible else 18 for t in scored],
                        edgecolors=["k" if t.feasible else "none" for t in scored])
    fig.colorbar(points, ax=ax, label="p99 ratio @512 (x faster)")
    ax.set_xscale("log")
    ax.set_xlabel("size ratio (baseline bytes / trial bytes)")
    ax.set_ylabel("relative loss of the main metric (valid split)")
    ax.set_title(f"recipe search: {len(report.trials)} trials, {report.wall_s:.0f} s")
    ax.axhline(0.0, color="grey", lw=0.8)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()
