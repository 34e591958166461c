"""`recsqueeze dataset ...` and `recsqueeze registry ...`: what the artifact store holds.

Each subcommand prints its result on stdout (a dataset's URI, a version record) and its
messages on stderr, without a traceback, and exits non-zero when it fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from flows.cli_common import STATE, err
from flows.stack import settings_for

if TYPE_CHECKING:
    from tasks.registry import Registry

dataset_app = typer.Typer(help="Datasets in the artifact store.", no_args_is_help=True)
registry_app = typer.Typer(help="The model registry.", no_args_is_help=True)


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


@registry_app.command("show")
def registry_show(model: str, version: int | None = None, state_dir: Path = STATE) -> None:
    """One version's record (default: production)."""
    from tasks.artifacts import IntegrityError

    if version is not None and version < 1:
        raise _fail(f"--version must be 1 or more (got {version}); omit it for production", 2)
    reg = _registry(state_dir)
    try:
        n = version if version is not None else reg.alias(model)
        versions = reg.versions(model)
    except IntegrityError as exc:  # a tampered alias record
        raise _fail(str(exc), 1) from None
    except ValueError as exc:  # not a registry name
        raise _fail(str(exc), 2) from None
    if not versions:
        raise _fail(f"registry has no model {model!r}; `recsqueeze registry list` shows the "
                    "models", 1)
    if n is None:
        raise _fail(f"{model} has no production version (versions: {versions}); give "
                    f"--version N, or `recsqueeze registry promote {model} N`", 1)
    if n not in versions:
        raise _fail(f"{model} has no version {n} (versions: {versions})", 1)
    problem = reg.verify(model, n)  # the bytes are read and checked, not only the record
    if problem is not None:
        raise _fail(problem, 1, style="red")
    print(json.dumps({**reg.version_info(model, n), "verified": True}, indent=2))


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
