"""Render a `recsqueeze bench --json F` file as the markdown table docs/benchmarks.md shows.

    .venv/bin/python docs/bench_table.py bench-results/two_tower-small.json [--budget 0.01]
    .venv/bin/python docs/bench_table.py bench-results/search-small-s0.json \
        bench-results/search-small-s1.json

One row per plan, the seeds side by side (s0 / s1; several files are read as one); `--budget`
adds a column for the family's default relative budget next to the suite's own 0.1%. The plan
the gate chose is in bold. Rows of a bench that timed serving exports get a column for the
exported program: its p99, eager p99 / its p99, and the baseline's program p99 / its p99.
An orchestration bench's file (`--suite orchestration`) renders as one row per executor.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def _join(values: list[str]) -> str:
    return values[0] if len(set(values)) == 1 else " / ".join(values)


def render(rows: list[dict], budget: float | None) -> str:
    by_plan: dict[str, list[dict]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r["seed"]):
        by_plan[row["plan"]].append(row)
    first = rows[0]
    base = sorted({(r["seed"], r["baseline_quality"]) for r in rows})
    lines = [f"baseline: {first['metric']} " + " / ".join(f"{q:.5f}" for _, q in base)
             + f", {first['baseline_bytes']:,} bytes, test rows {first['test_rows']:,}"
             + (f"; the gate's budget: relative loss bound <= {first['budget']:.1%}"
                if "budget" in first else ""), ""]
    exports = any("export_error" in r for r in rows)  # rows of a bench with serving exports
    header = ["plan", "size", f"{first['metric']} delta", "rel. loss bound", "logloss delta",
              "p99 ratio @512 [95% CI]", "passes"]
    if exports:
        header.append("export p99 @512, vs eager, vs the baseline's export [95% CI]")
    if budget is not None:
        header.append(f"passes {budget:.1%}")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---" * len(header) + "|")
    for plan, runs in by_plan.items():
        size = _join([f"{r['size_ratio']:.2f}x" for r in runs])
        delta = _join([f"{r['delta']:+.5f}" for r in runs])
        bound = _join([f"{r['relative_loss_ci_high']:.5f}" for r in runs])
        latency = _join([f"{r['latency_ratio']:.2f}x [{r['latency_ratio_low']:.2f}, "
                         f"{r['latency_ratio_high']:.2f}]" for r in runs])
        passed = _join(["yes" if r["passed"] else "no" for r in runs])
        logloss = _join([f"{r['logloss_delta']:+.5f}" if r["logloss_delta"] is not None
                         else "-" for r in runs])
        name = f"**{plan}**" if any(r.get("chosen") for r in runs) else plan
        seeds = "" if len({r["seed"] for r in rows}) == len({r["seed"] for r in runs}) else \
            " (s" + ",".join(str(r["seed"]) for r in runs) + ")"
        cells = [name + seeds, size, delta, bound, logloss, latency, passed]
        if exports:
            cells.append(_join([
                f"{r['export_p99_ms_bs512']:.2f} ms, {r['export_vs_eager']:.2f}x eager, "
                f"{r['export_latency_ratio']:.2f}x [{r['export_latency_ratio_low']:.2f}, "
                f"{r['export_latency_ratio_high']:.2f}]" if r.get("export_p99_ms_bs512")
                else f"not exported: {r.get('export_error')}" for r in runs]))
        if budget is not None:
            cells.append(_join(["yes" if r["relative_loss_ci_high"] <= budget else "no"
                                for r in runs]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _s(stats: dict | None) -> str:
    if not stats or stats.get("median") is None:
        return "-"
    return f"{stats['median']:.2f} / {stats['p95']:.2f}"


def render_orchestration(rows: list[dict]) -> str:
    """The bare run and the flow on 1..n nodes: wall time, ratios (the efficiency against the
    one-node flow; against the bare run, with the most the plan's dependencies allow),
    per-task overhead (median / p95 seconds) and where it went; then the time outside tasks,
    and the overhead per kind of task."""
    lines = ["| executor | wall s | overhead ratio | efficiency | of the bare run (plan allows "
             "at most) | overhead / task | first task on a node | later tasks | of it S3 | "
             "of it other |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["config"] == "bare":
            lines.append(f"| bare process | {r['wall_s']:.1f} | 1 | - | - | - | - | - | - | - |")
            continue
        ratio = f"{r['overhead_ratio']:.2f}" if "overhead_ratio" in r else "-"
        eff = f"{r['parallel_efficiency']:.0%}" if "parallel_efficiency" in r else "-"
        bare = "-"
        if "bare_efficiency" in r:
            bare = f"{r['bare_efficiency']:.0%}"
            if "plan_bound_efficiency" in r:
                bare += f" ({r['plan_bound_efficiency']:.0%})"
        lines.append(
            f"| flow, {r['nodes']} node(s) | {r['wall_s']:.1f} | {ratio} | {eff} | {bare} | "
            f"{_s(r['overhead_per_task_s'])} | {_s(r.get('overhead_first_task_on_node_s'))} | "
            f"{_s(r.get('overhead_later_tasks_s'))} | {_s(r['where']['s3_s'])} | "
            f"{_s(r['where']['other_s'])} |")
    flows = [r for r in rows if r["config"] != "bare" and "outside_tasks" in r]
    if flows:
        lines += ["", "| executor | driver start s | driver end s | no task running s | gap "
                  "between tasks on a node | node s in no task | S3 MB moved |",
                  "|---|---|---|---|---|---|---|"]
        for r in flows:
            out = r["outside_tasks"]
            lines.append(
                f"| flow, {r['nodes']} node(s) | {out['driver_start_s']:.1f} | "
                f"{out['driver_end_s']:.1f} | {out['no_task_running_s']:.1f} | "
                f"{_s(out['node_gaps_s'])} | {r['unused_node_s']:.1f} | "
                f"{r['s3_bytes'] / 1e6:,.0f} |")
    by_op = [r for r in flows if "overhead_by_op_s" in r]
    if by_op:
        ops = sorted({op for r in by_op for op in r["overhead_by_op_s"]})
        lines += ["", "| overhead s per kind of task: tasks x median (sum) | "
                  + " | ".join(f"flow, {r['nodes']} node(s)" for r in by_op) + " |",
                  "|---" * (len(by_op) + 1) + "|"]
        for op in ops:
            cells = []
            for r in by_op:
                st = r["overhead_by_op_s"].get(op)
                cells.append("-" if not st or st["median"] is None else
                             f"{st.get('n', '?')} x {st['median']:.2f} ({st['sum']:.1f})")
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", type=Path, nargs="+")
    parser.add_argument("--budget", type=float, default=None,
                        help="also judge the relative loss bound against this budget")
    args = parser.parse_args()
    rows = [row for f in args.json_file for row in json.loads(f.read_text())]
    if rows and rows[0].get("suite") == "orchestration":
        print(render_orchestration(rows))
        return
    print(render(rows, args.budget))


if __name__ == "__main__":
    main()
