"""`recsqueeze dataset ...` and `recsqueeze registry ...`: what the artifact store holds.

Each subcommand prints its result on stdout (a dataset's URI, a version record) and its
messages on stderr, without a traceback, and exits non-zero when it fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from flows.cli_common import STATE, err
from flows.stack import settings_for

if TYPE_CHECKING:
    from tasks.registry import Registry
    from tasks.types import ModelSpec

dataset_app = typer.Typer(help="Datasets in the artifact store.", no_args_is_help=True)
registry_app = typer.Typer(help="The model registry.", no_args_is_help=True)
model_app = typer.Typer(help="Models you trained, brought in to be compressed.",
                        no_args_is_help=True)


@dataset_app.command("generate")
def dataset_generate(size: str = typer.Option("small"), seed: int = 0,
                     state_dir: Path = STATE) -> None:
    """Generate the built-in click log into S3 and print its URI."""
    from tasks.artifacts import ArtifactStore
    from tasks.generator import generate

    tables, spec = generate(size, seed)
    ref = ArtifactStore(settings_for(state_dir)).put_dataset(tables, spec)
    print(ref.uri)
    err.print(f"rows {ref.rows}; Bayes-optimal test AUC {spec.bayes_auc:.5f}")


@dataset_app.command("import")
def dataset_import(
    spec: Path = typer.Argument(..., metavar="SPEC", help="spec.json naming each column's role"),
    path: Path = typer.Argument(..., metavar="PATH", help="directory of train/valid/test "
                                "(.parquet or .csv), or one .parquet/.csv file to split by time"),
    state_dir: Path = STATE,
) -> None:
    """Check your own dataset and upload it to S3; print its URI (a request's dataset.uri)."""
    from rich.markup import escape

    from tasks.datacheck import DatasetError
    from tasks.dataimport import import_dataset

    try:
        with err.status("checking and uploading ..."):
            ref = import_dataset(spec, path, settings_for(state_dir))
    except DatasetError as exc:
        err.print(f"[red]invalid dataset:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as exc:  # the checks passed; the store did not answer
        err.print(f"[red]upload failed:[/red] {escape(str(exc))}; is the stack up "
                  "(`recsqueeze up`)?", soft_wrap=True)
        raise typer.Exit(1) from None
    print(ref.uri)
    err.print(f"rows {ref.rows}")


@model_app.command("import")
def model_import(
    weights: Path = typer.Argument(..., metavar="WEIGHTS", help="a .safetensors file, or a torch "
                                   "state_dict file (read with weights_only=True)"),
    spec: str = typer.Option(..., "--spec", help="the model's spec: a JSON file, or the JSON "
                             "itself, as a request's \"model\" (e.g. '{\"family\": \"dlrm\"}')"),
    dataset: str = typer.Option(..., "--dataset", help="URI of the dataset it was trained for "
                                "(`recsqueeze dataset import` prints it)"),
    name: str = typer.Option(..., "--name", help="name to import it under (NAME@latest)"),
    state_dir: Path = STATE,
) -> None:
    """Check a trained model against its spec and dataset, store it; print its URI (a
    request's "baseline"). Importing the same weights again prints the same URI."""
    from pydantic import ValidationError

    from tasks.modelimport import import_file

    try:
        with err.status("checking the model ..."):
            record, written = import_file(weights, _model_spec(spec), dataset, name,
                                          settings_for(state_dir))
    except ValidationError as exc:
        from tasks.errors import explain

        lines = "; ".join(explain(exc).splitlines())
        raise _fail(f"import refused: --spec {lines}", 2) from None
    except ValueError as exc:  # ImportRefused, a bad dataset URI
        raise _fail(f"import refused: {exc}", 2) from None
    except OSError as exc:
        raise _fail(f"import failed: {exc}; is the stack up (`recsqueeze up`)?", 1) from None
    print(record.model.uri)
    if written:
        err.print(f"imported {record.model_name}: {record.spec.family} model, "
                  f"{record.model.size_bytes} bytes, checked on {record.dataset['uri']}")
    else:
        err.print(f"already imported as {record.model_name} at {record.imported_at}: "
                  "nothing written")


@model_app.command("list")
def model_list(name: str = typer.Argument(..., help="the name models were imported under"),
               state_dir: Path = STATE) -> None:
    """The models imported under NAME, oldest first: URI, family, when (NAME@latest is last)."""
    from tasks.artifacts import ArtifactStore
    from tasks.modelimport import imports

    found = imports(ArtifactStore(settings_for(state_dir)), name)
    if not found:
        raise _fail(f"no model was imported under {name!r}", 1)
    for record in found:
        print(f"{record.imported_at}  {record.spec.family:9s}  {record.model.uri}")


def _model_spec(text: str) -> ModelSpec:
    """A spec given as JSON text or as the path of a JSON file."""
    from tasks.types import parse_model_spec

    if not text.lstrip().startswith("{"):
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise ValueError(f"--spec {text}: cannot read it ({exc.strerror}); give a JSON "
                             "file or the JSON itself") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--spec: invalid JSON at line {exc.lineno} column {exc.colno}: "
                         f"{exc.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError('--spec: a JSON object, as a request\'s "model" (e.g. {"family": '
                         '"dlrm", "embedding_dim": 64})')
    return parse_model_spec(raw)


def _registry(state_dir: Path) -> Registry:
    from tasks.artifacts import ArtifactStore
    from tasks.registry import Registry  # boto3: only for the store's commands

    return Registry(ArtifactStore(settings_for(state_dir)))


def _fail(message: str, code: int, style: str | None = None) -> typer.Exit:
    """Print `message` as it is (no markup: it may quote a user's text); return the Exit to
    raise."""
    err.print(message, style=style, soft_wrap=True, markup=False)
    return typer.Exit(code)


@registry_app.command("list")
def registry_list(state_dir: Path = STATE) -> None:
    """Models, their versions and aliases (exit 1 if an alias record cannot be read)."""
    reg = _registry(state_dir)
    broken = 0
    for model in reg.models():
        try:
            print(f"{model}: versions {reg.versions(model)} production={reg.alias(model)} "
                  f"previous={reg.alias(model, 'previous')}")
        except ValueError as exc:  # a tampered alias record: name it, list the others
            err.print(str(exc), style="red", soft_wrap=True, markup=False)
            broken += 1
    if broken:
        raise typer.Exit(1)


def _version(reg: Registry, model: str, version: int | None, alias: str) -> int:
    """The version a command names (--version N, else the alias), checked to exist."""
    from tasks.artifacts import IntegrityError

    if version is not None and version < 1:
        raise _fail(f"--version must be 1 or more (got {version}); omit it for {alias}", 2)
    try:
        n = version if version is not None else reg.alias(model, alias)
        versions = reg.versions(model)
    except IntegrityError as exc:  # a tampered alias record
        raise _fail(str(exc), 1) from None
    except ValueError as exc:  # not a registry name
        raise _fail(str(exc), 2) from None
    if not versions:
        raise _fail(f"registry has no model {model!r}; `recsqueeze registry list` shows the "
                    "models", 1)
    if n is None:
        raise _fail(f"{model} has no {alias} version (versions: {versions}); give "
                    f"--version N, or `recsqueeze registry promote {model} N`", 1)
    if n not in versions:
        raise _fail(f"{model} has no version {n} (versions: {versions})", 1)
    return n


VERSION = typer.Option(None, "--version", help="version number (default: the alias)")
ALIAS = typer.Option("production", "--alias", help="alias to follow when --version is not given")


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(soft_wrap=True, highlight=False)
    out.print(f"[bold]{s['model']} v{s['version']}[/bold]  candidate {s['candidate']}  "
              f"(verified: every file matches version.json)")
    out.print(f"plan: {' -> '.join(s['plan']) or 'the baseline'}", markup=False)
    r = s["ratios"]
    lat = ", ".join(
        f"{x['value']:.2f}x @{x['batch_size']}" + (f" [{x['ci_low']:.2f}, {x['ci_high']:.2f}]"
                                                  if x["side_by_side"] else " (not side by side)")
        for x in r["latency_p99"]) or "not measured"
    out.print(f"size {s['metrics']['size_bytes']:,} bytes = {r['size']:.2f}x smaller than the "
              f"baseline's {s['baseline']['size_bytes']:,}; p99 {lat} faster")
    table = Table("metric", "value", "95% CI", "vs baseline", "loss bound")
    deltas = {d["metric"]: d for d in s["deltas"]}
    for name, e in s["metrics"]["quality"].items():
        d = deltas.get(name)
        table.add_row(name, f"{e['value']:.5f}", f"[{e['ci_low']:.5f}, {e['ci_high']:.5f}]",
                      f"{d['delta']:+.5f}" if d else "", f"{d['loss_ci_high']:.5f}" if d else "")
    if s["metrics"]["logloss"] is not None:
        d = deltas.get("logloss")
        table.add_row("logloss", f"{s['metrics']['logloss']:.5f}", "",
                      f"{d['delta']:+.5f}" if d else "", f"{d['loss_ci_high']:.5f}" if d else "")
    out.print(table)
    b = s["budget"]
    limits = "; ".join(f"{k}: loss <= {v['max_drop']:g}{' (relative)' if v['relative'] else ''}"
                       for k, v in b["metrics"].items())
    extra = [f"{k}={b[k]}" for k in ("max_size_bytes", "min_size_ratio", "max_p99_ms",
                                     "min_latency_ratio") if b.get(k) is not None]
    out.print(f"budget passed: {limits} at {b['confidence']:.0%} confidence"
              + (f"; {', '.join(extra)}" if extra else "") + f"; objective {b['objective']}",
              markup=False)
    lin = s["lineage"]
    out.print(f"lineage: run {lin['run_id']}, code {lin['code_git_sha']}, dataset "
              f"{lin['dataset_uri']} (sha256 {lin['dataset_sha256']}), seeds {lin['seeds']}",
              markup=False)
    for c in lin["chain"]:
        out.print(f"  {c['stage']}: {c['wall_s']} s on {c['ray_node']} ({c['device']})",
                  markup=False)
    for name, uri in s["uris"].items():
        out.print(f"{name}: {uri}", markup=False)
    if s["export_error"]:
        out.print(f"no serving export: {s['export_error']}", markup=False)


@registry_app.command("show")
def registry_show(model: str, version: int | None = VERSION, alias: str = ALIAS,
                  as_json: bool = typer.Option(False, "--json", help="one JSON object"),
                  state_dir: Path = STATE) -> None:
    """A version (default: production): metrics with 95% intervals, the budget it passed,
    size and latency ratios, lineage and the URIs of its card, plot and serving export."""
    from tasks.artifacts import IntegrityError
    from tasks.serving import version_summary

    reg = _registry(state_dir)
    n = _version(reg, model, version, alias)
    problem = reg.verify(model, n)  # the bytes are read and checked, not only the record
    if problem is not None:
        raise _fail(problem, 1, style="red")
    try:
        summary = version_summary(reg, model, n)
    except (IntegrityError, ValueError) as exc:
        raise _fail(str(exc), 1, style="red") from None
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


@registry_app.command("export")
def registry_export(
    model: str, directory: Path = typer.Argument(..., metavar="DIR", help="where to write"),
    version: int | None = VERSION, alias: str = ALIAS,
    aoti: bool = typer.Option(False, "--aoti", help="also an AOTInductor package for this "
                              "CPU (compiles C++: a minute or more)"),
    state_dir: Path = STATE,
) -> None:
    """Write a version's serving export to DIR: model.pt2 (a torch.export program that
    plain torch loads: `torch.export.load(path).module()(dense, sparse)`) and serving.json
    (inputs, their column order, the output's meaning). See docs/serving.md."""
    from tasks.artifacts import IntegrityError
    from tasks.export import ExportError
    from tasks.serving import version_export

    reg = _registry(state_dir)
    n = _version(reg, model, version, alias)
    try:
        with err.status(f"exporting {model} v{n} ..."):
            files, source = version_export(reg, model, n, aoti=aoti)
    except ExportError as exc:
        raise _fail(f"cannot export {model} v{n}: {exc}", 1, style="red") from None
    except (IntegrityError, ValueError) as exc:
        raise _fail(str(exc), 1, style="red") from None
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (directory / name).write_bytes(body)
        print(directory / name)
    err.print(f"{model} v{n}: {len(files)} files ({source})")


@registry_app.command("promote")
def registry_promote(model: str, version: int, state_dir: Path = STATE) -> None:
    """Point `production` at VERSION (the version it replaces becomes `previous`)."""
    reg = _registry(state_dir)
    try:
        reg.set_alias(model, "production", version)
    except ValueError as exc:
        raise _fail(str(exc), 1) from None
    print(f"{model}: production={reg.alias(model)} previous={reg.alias(model, 'previous')}")


@registry_app.command("rollback")
def registry_rollback(model: str, state_dir: Path = STATE) -> None:
    """Swap `production` and `previous` (run it again to roll forward)."""
    reg = _registry(state_dir)
    try:
        production, previous = reg.rollback(model)
    except ValueError as exc:
        raise _fail(str(exc), 1) from None
    print(f"{model}: production={production} previous={previous}")
