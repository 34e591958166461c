"""`recsqueeze` command line: up | down | status | run | bench | gate-sim, and the store's
`dataset` and `registry` subcommands (`flows.cli_store`)."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from flows.cli_common import STATE, err
from flows.cli_store import dataset_app, model_app, registry_app
from flows.stack import (
    heal_stack,
    load_stack,
    settings_for,
    stack_alive,
    start_stack,
    stop_stack,
)
from tasks.types import CompressionRequest, DatasetRequest
from tasks.types.record import ImportRecord

app = typer.Typer(help="Distributed compression of recommendation models.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
app.add_typer(registry_app, name="registry")
app.add_typer(model_app, name="model")


def main() -> None:
    """The `recsqueeze` program. SIGTERM (a `timeout`, a scheduler, `kill`) exits as Ctrl-C
    does: through the finally blocks, so a bench or a demo killed mid-run stops the stacks it
    started instead of leaving a Prefect server, S3 and Ray nodes running. Installed here, in
    the program, and not in `app`: a process that calls `app` in-process (a test runner, a
    notebook) keeps its own SIGTERM handling."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    app()


@app.command()
def up(state_dir: Path = STATE, workers: int = typer.Option(1, min=1, max=8),
       work_pool: str = typer.Option(
           "", help="register the deployments in this `process` work pool and start a "
           "`prefect worker` for it (what production runs); empty: serve them"),
       db: str = typer.Option("sqlite", help="the Prefect server's database: sqlite, or "
                              "postgres (a local PostgreSQL under the state dir)")) -> None:
    """Start S3 (SeaweedFS), a Prefect server and a Ray head + worker nodes on loopback.

    On a stack that is partly down, restart only what is down, on the same ports: a run in
    flight, the UI and the other nodes keep their addresses.
    """
    existing = load_stack(state_dir)
    if existing is not None and not any(stack_alive(existing).values()):
        stop_stack(existing)  # all of it is gone (a reboot): nothing to keep, start afresh
        existing = None
    if existing is not None:
        down = [name for name, ok in stack_alive(existing).items() if not ok]
        if not down:
            err.print(f"stack already up (Prefect UI {existing.prefect.ui_url})")
            return
        try:
            with err.status(f"restarting {', '.join(down)} ..."):
                stack, restarted = heal_stack(existing)
        except (RuntimeError, TimeoutError) as exc:
            err.print(f"could not restart {', '.join(down)}: {exc}", markup=False)
            raise typer.Exit(1) from None
        err.print(f"restarted {', '.join(restarted)} on the same ports")
        return
    with err.status("starting S3, Prefect and Ray ..."):
        stack = start_stack(state_dir, worker_ips=tuple(f"127.0.0.{3 + i}" for i in range(workers)),
                            well_known_ports=True, work_pool=work_pool or None, db=db)
    err.print(f"S3      {stack.s3.endpoint} (bucket {stack.s3.bucket})")
    if stack.postgres:
        err.print(f"DB      PostgreSQL {stack.postgres.host}:{stack.postgres.port} (Prefect's)")
    if stack.work_pool:
        err.print(f"Worker  work pool {stack.work_pool} (process)")
    err.print(f"Prefect {stack.prefect.ui_url}")
    err.print(f"Ray     {stack.ray.address} ({len(stack.ray.nodes)} nodes)")


@app.command()
def down(state_dir: Path = STATE) -> None:
    """Stop what `up` started (and nothing else)."""
    stack = load_stack(state_dir)
    if stack is None:
        err.print("no stack running")
        return
    stop_stack(stack)
    err.print("stack stopped")


@app.command()
def status(state_dir: Path = STATE) -> None:
    """Show each part of the local stack and whether it is up; exit 1 if any part is down."""
    stack = load_stack(state_dir)
    if stack is None:
        err.print("no stack running")
        raise typer.Exit(1)
    states = stack_alive(stack)
    for name, ok in states.items():
        print(f"{name:20s} {'up' if ok else 'DOWN'}")
    print(f"Prefect UI           {stack.prefect.ui_url}")
    down = [name for name, ok in states.items() if not ok]
    if down:
        err.print(f"down: {', '.join(down)}; `recsqueeze up` restarts only those, on the same "
                  "ports")
        raise typer.Exit(1)


@app.command()
def run(
    request_file: Path | None = typer.Option(None, "--request", help="CompressionRequest JSON"),
    size: str | None = typer.Option(None, help="built-in dataset size (tiny|small)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on stdout"),
    quiet: bool = typer.Option(False, "--quiet", help="no live progress while the run goes"),
    state_dir: Path = STATE,
) -> None:
    """Run the compression flow and print the leaderboard and the promoted model; while it
    runs, one line per candidate and an overall bar (plain lines when not on a terminal)."""
    from pydantic import ValidationError
    from rich.markup import escape

    from tasks.errors import explain

    try:
        raw = _read_request(request_file) if request_file else {}
        if size:
            if size not in ("tiny", "small", "small_ids"):
                raise ValueError(f"--size must be tiny, small or small_ids (got {size!r}); for "
                                 "your own data give --request with dataset.uri")
            raw["dataset"] = DatasetRequest(builtin=size).model_dump(mode="json")  # type: ignore[arg-type]
        request = CompressionRequest.model_validate(raw)
    except ValidationError as exc:
        lines = explain(exc, CompressionRequest)
        sep = "\n" if "\n" in lines else " "  # one line per field; one error, one line
        err.print(f"[red]invalid request:[/red]{sep}{escape(lines)}", soft_wrap=True)
        raise typer.Exit(2) from None
    except ValueError as exc:
        err.print(f"[red]invalid request:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    from flows.driver import require_prefect_server, run_compress  # Prefect, Ray: after the checks

    settings = settings_for(state_dir)
    try:
        require_prefect_server(settings)
    except RuntimeError as exc:  # no stack at --state-dir: say so, not a traceback
        err.print(f"[red]no stack:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    imported = None
    if request.baseline is not None:  # the import it names, found before the run starts
        from tasks.artifacts import ArtifactStore
        from tasks.modelimport import resolve_baseline

        try:
            request, imported = resolve_baseline(ArtifactStore(settings), request)
        except ValueError as exc:
            err.print(f"[red]invalid request:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(2) from None
    # progress: on stdout before the table, on stderr when stdout is the JSON result
    console = Console(file=sys.stderr if as_json else sys.stdout, soft_wrap=True)
    try:
        with contextlib.redirect_stdout(sys.stderr), _user_errors_without_traceback(), \
                _progress(request, imported, settings.prefect_api_url, console,
                          quiet) as run_name:
            report = run_compress(request, settings, run_name)  # stdout is kept for the result
    except ValueError as exc:  # bad input found once the run could look (data, cluster)
        err.print(f"[red]run refused:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    ui = settings.prefect_api_url.removesuffix("/api")
    if as_json:
        out = {"run_id": report.run_id, "status": report.status, "reason": report.reason,
               "baseline": report.baseline.model_dump(mode="json"),
               "bayes_auc": report.dataset.spec.bayes_auc,
               "leaderboard": [r.model_dump(mode="json") for r in report.leaderboard],
               "promoted": report.promoted.model_dump(mode="json") if report.promoted else None,
               "failures": report.failures, "skipped": report.skipped,
               "trivial_baselines": [t.model_dump(mode="json") for t in report.trivial],
               "resolution": [r.model_dump(mode="json") for r in report.resolution],
               "warnings": list(report.warnings), "prefect_ui": ui}
        print(json.dumps(out, indent=2))
    else:
        print_report(report, ui)
    if report.status == "stopped":  # nothing was compressed: say so to scripts too
        raise typer.Exit(1)


@contextlib.contextmanager
def _progress(request: CompressionRequest, imported: ImportRecord | None, api_url: str,
              console: Console, quiet: bool) -> Iterator[str | None]:
    """Live progress (flows.progress) of the run started inside, found by the flow run name it
    yields (None: quiet, Prefect names the run)."""
    if quiet:
        yield None
        return
    import threading
    import uuid

    from flows.progress import Progress, Watcher, plan_nodes, show
    from tasks.plan import plan

    name = f"cli-{uuid.uuid4().hex[:12]}"
    graph = plan(request, imported=imported)
    rule = request.budget.metrics.get("main")
    progress = Progress(list(graph.candidates), planned=len(graph.nodes),
                        budget=rule.max_drop if rule else None,
                        relative=rule.relative if rule else True)
    stop = threading.Event()
    drawer = threading.Thread(target=show, daemon=True, name="progress", args=(
        progress, Watcher(name, api_url, plan_nodes(graph)), console, stop))
    drawer.start()
    try:
        yield name
    finally:
        stop.set()
        drawer.join(timeout=30)


def _read_request(path: Path) -> dict[str, object]:
    """The JSON object in `path`; a ValueError naming the file and the fix otherwise."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"--request {path}: file not found; give the path of a "
                         "CompressionRequest JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--request {path}: cannot read it as text ({exc}); give a JSON "
                         "file") from None
    if not text.strip():
        raise ValueError(f"--request {path}: empty file; write the request as a JSON object "
                         "({} takes every default)")
    try:
        raw = json.loads(text)  # as a user writes it: NaN and Infinity are read, then refused
    except json.JSONDecodeError as exc:
        raise ValueError(f"--request {path}: invalid JSON at line {exc.lineno} column "
                         f"{exc.colno}: {exc.msg}") from None
    if not isinstance(raw, dict):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
            type(raw), "number")
        raise ValueError(f"--request {path}: a request is a JSON object of fields, "
                         f'e.g. {{"model_name": "ctr-ranker"}} (got a JSON {kind})')
    return raw


def print_report(report, ui: str) -> None:  # type: ignore[no-untyped-def]
    from tasks.report import baseline_line, timed_on

    console = Console(width=None if sys.stdout.isatty() else 200)  # no wrapping into a log
    b = report.baseline
    bayes = report.dataset.spec.bayes_auc
    console.print(f"baseline {baseline_line(b)}"
                  + (f"; generator Bayes AUC {bayes:.5f}" if bayes and b.main == "auc" else ""))
    for t in report.trivial:
        console.print(f"  vs trivial {t.name}: {t.metric} {t.value:.5f}, margin {t.margin:+.5f} "
                      f"(lower bound {t.margin_low:+.5f})")
    for r in report.resolution:
        console.print(f"  budget {r.metric}: allows {r.budget:.5f}, the test split resolves "
                      f"{r.resolution:.5f} ({'ok' if r.resolvable else 'too coarse'})")
    for warning in report.warnings:
        console.print(f"[yellow]warning[/yellow] {warning}", soft_wrap=True)
    table = Table(title=f"leaderboard (run {report.run_id})")
    for col in ("candidate", "plan", "size_ratio", f"{b.main} delta", "loss_ci_high",
                "p99_ms_bs512", "latency_ratio", "passed", "node"):
        table.add_column(col)
    for r in report.leaderboard:
        table.add_row(r.candidate, r.plan, f"{r.size_ratio:.2f}x", f"{r.delta:+.5f}",
                      f"{r.loss_ci_high:.5f}",
                      f"{r.p99_ms_bs512:.3f}" if r.p99_ms_bs512 is not None else "-",
                      (f"{r.latency_ratio:.2f}x [{r.latency_ratio_low:.2f}, "
                       f"{r.latency_ratio_high:.2f}]" if r.latency_ratio_low is not None else
                       f"{r.latency_ratio:.2f}x") if r.latency_ratio else "-",
                      "yes" if r.passed else "no: " + "; ".join(r.reasons), r.node_ip)
    console.print(table)
    for line in timed_on(report.leaderboard):
        console.print(line)
    for cand, error in report.failures.items():
        console.print(f"[red]failed[/red] {cand}: {error}")
    for cand, why in report.skipped.items():
        console.print(f"[yellow]skipped[/yellow] {cand}: {why}")
    if report.promoted:
        console.print(f"promoted: {report.promoted.uri} (version {report.promoted.version})")
    else:
        stopped = report.status == "stopped"
        console.print(f"{'stopped before compression' if stopped else 'not promoted'}: "
                      f"{report.reason}", soft_wrap=True)
    console.print(f"Prefect UI: {ui}")


@app.command()
def bench(
    suite: str = typer.Option("quantize", help="benchmark suite"),
    size: str = typer.Option("small", help="built-in dataset size"),
    json_out: Path = typer.Option(Path("bench.json"), "--json", help="rows are written here"),
    seeds: int = typer.Option(1, min=1, help="training seeds (rows repeat per seed)"),
    first_seed: int = typer.Option(0, min=0, help="the first training seed"),
) -> None:
    """Baseline and one candidate per config, same data, one process; one JSON row each
    (suites search, search_two_tower, search_sasrec: the family's default candidates and a
    recipe search under the same budget; orchestration: one row per executor, the bare
    process and the Prefect flow on Ray clusters of 1, 2 and 3 one-CPU nodes)."""
    from tasks.bench import run_suite

    progress = logging.StreamHandler()
    progress.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("recsqueeze").addHandler(progress)
    logging.getLogger("recsqueeze").setLevel(logging.INFO)
    rows = []
    if suite == "orchestration":  # the flow on fresh stacks of 1, 2, 3 Ray nodes vs bare
        from flows.orchestration import run_orchestration

        rows = run_orchestration(size, log=err.print)
    for seed in range(first_seed, first_seed + seeds) if suite != "orchestration" else ():
        rows += run_suite(suite, size, seed, log=err.print)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(rows, indent=2))
    err.print(f"{len(rows)} rows -> {json_out}")


@app.command("gate-sim")
def gate_sim(margins: str = typer.Option("-0.5,0,0.1,0.25,0.5", help="true loss = budget*(1+m)"),
             rows: int = 200_000, trials: int = 200, budget: float = 0.001,
             confidence: float = 0.95, json_out: Path | None = typer.Option(None, "--json")) -> None:
    """Simulate the gate's false-promotion rate on candidates just over the AUC budget."""
    from tasks.simulate import pass_rate

    out = []
    for m in (float(x) for x in margins.split(",")):
        row = pass_rate(m, rows, trials, budget, confidence)
        out.append(row)
        print(f"true relative loss {row['true_relative_loss']:.5f} (budget x {1 + m:.2f}): "
              f"passed {row['pass_rate']:.3f} of {trials} trials")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(out, indent=2))


class _NoTraceback(logging.Filter):
    """Drops the traceback of a log record whose exception is bad input (a ValueError names
    the field and the fix; its stack says nothing more to a user), keeping its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ValueError):
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def _user_errors_without_traceback() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    quiet = _NoTraceback()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


if __name__ == "__main__":
    main()
