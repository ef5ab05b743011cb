"""``customcrafter models ...``: the subject models of the MLflow registry (thin wrappers over
customcrafter.orchestration.registry), and the ``models:/`` resolution that ``sample`` and ``sample-eval-set`` use
for ``--subject-module``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from customcrafter.cli import UserError, app

models_app = typer.Typer(no_args_is_help=True, help="Registered subject models (MLflow registry): list them; "
                                                    "sample one with --subject-module models:/NAME@ALIAS.")
app.add_typer(models_app, name="models")

TRACKING_ENV = "MLFLOW_TRACKING_URI"
TrackingUriOption = Annotated[str | None, typer.Option(
    "--tracking-uri", help=f"MLflow tracking/registry URI (default: ${TRACKING_ENV}).")]
#: gate metrics first, in the gate's order; any other tagged metric after them
_GATE_METRICS = ("dino_i", "clip_t", "motion")
#: MLflow retries an unreachable server 7 times with backoff (minutes); a command line answers in seconds. And no
#: download progress bars around the command's own output.
_QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def tracking_uri_or_error(value: str | None, needed_for: str) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else a UserError naming both (and what needed it)."""
    uri = value or os.environ.get(TRACKING_ENV, "").strip()
    if not uri:
        raise UserError(f"{needed_for}: no registry to read: give --tracking-uri URI or set {TRACKING_ENV} "
                        "(e.g. http://mlflow.example.com, or sqlite:///outputs/local/mlflow.db after run-local)")
    database = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    if database and not Path(database).is_file():  # MLflow would create an empty one and find nothing in it
        raise UserError(f"{needed_for}: the registry {uri} does not exist ({database} is not a file)")
    return uri


def quick_http():
    """MLflow's HTTP retries and timeout lowered (and its progress bars off) for the block, unless the user set
    them; then put back."""
    from customcrafter.utils import scoped_environ

    return scoped_environ(_QUICK_HTTP, keep_set=True)


def _registry_failure(exc: Exception, tracking_uri: str) -> str:
    from customcrafter.orchestration.registry import display_error, display_uri

    return f"could not read the registry at {display_uri(tracking_uri)}: {display_error(exc, tracking_uri)}"


def resolve_module_origin(value: str | Path, tracking_uri: str | None) -> tuple[Path, dict | None]:
    """A ``--subject-module`` value as a local folder, and where a registered module came from (None for a folder).

    A ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI is resolved through the registry (its subject module
    downloaded once into the cache); anything else is a path. The origin is the URI as given, the model name,
    version, the alias if the URI used one, and the run that logged the version - what an evaluation set records, so
    its videos can be traced to (and a rerun checked against) one registered version. Errors are UserErrors naming
    ``--subject-module`` and the URI. (A module trained on another base model than ``--base-model`` is warned about
    when it loads, by ``load_subject_module``, wherever the module comes from.)"""
    from customcrafter.orchestration.registry import (
        RegistryLookupError,
        is_registry_uri,
        parse_registry_uri,
        resolve_registered_module,
    )

    if not is_registry_uri(value):
        return Path(value), None
    option = f"--subject-module {value}"
    uri = tracking_uri_or_error(tracking_uri, option)
    try:
        with quick_http():
            resolved = resolve_registered_module(str(value), uri)
    except (RegistryLookupError, ValueError) as exc:
        raise UserError(f"{option}: {str(exc).removeprefix(f'{value}: ')}") from None
    except Exception as exc:  # noqa: BLE001 - unreachable server, permissions...: one line, exit 1
        raise RuntimeError(f"{option}: {_registry_failure(exc, uri)}") from None
    version = resolved.version
    aliases = f" ({', '.join(version.aliases)})" if version.aliases else ""
    typer.echo(f"{value}: {version.name} v{version.version}{aliases} -> {resolved.path}", err=True)
    origin = {"uri": str(value), "name": version.name, "version": version.version,
              "alias": parse_registry_uri(str(value))[1], "run_id": version.run_id}
    return resolved.path, origin


def _metric_names(versions) -> list[str]:
    seen = {name for version in versions for name in version.metrics}
    return [m for m in _GATE_METRICS if m in seen] + sorted(seen - set(_GATE_METRICS))


@models_app.command("list")
def list_(
    tracking_uri: TrackingUriOption = None,
    subject: Annotated[str | None, typer.Option("--subject", help="Only customcrafter-<SUBJECT>.")] = None,
) -> None:
    """Every version of the customcrafter-* models: aliases, method, base model, data revision, gate metrics."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from customcrafter.orchestration.registry import display_uri, list_registered_versions, model_name

    uri = tracking_uri_or_error(tracking_uri, "models list")
    shown = display_uri(uri)
    if subject is not None:
        try:
            model_name(subject)
        except ValueError as exc:
            raise UserError(f"--subject {exc.args[0].removeprefix('subject: ')}") from None
    try:
        with quick_http():
            versions = list_registered_versions(uri, subject)
    except Exception as exc:  # noqa: BLE001 - unreachable server, not a registry...: one line, exit 1
        raise RuntimeError(_registry_failure(exc, uri)) from None
    if not versions:
        if subject is not None:
            raise UserError(f"--subject {subject}: no versions of {model_name(subject)} at {shown} "
                            "(`customcrafter models list` shows what is registered)")
        typer.echo(f"no customcrafter-* models registered at {shown} (a pipeline run registers each subject it "
                   "trains)")
        return
    metrics = _metric_names(versions)
    table = Table(title=f"registered models at {shown}", title_justify="left")
    for header in ("name", "version", "aliases", "method", "base model", "data revision", *metrics):
        numeric = header == "version" or header in metrics
        table.add_column(header, justify="right" if numeric else "left", overflow="fold")
    for version in versions:
        cells = [version.name, str(version.version), ", ".join(version.aliases), version.method or "-",
                 version.base_model_id or "-", version.data_revision or "-"]
        cells += [f"{version.metrics[m]:.4g}" if m in version.metrics else "-" for m in metrics]
        table.add_row(*(Text(cell) for cell in cells))  # Text: names and tags are not rich markup
    console = Console()
    if not console.is_terminal:  # piped or captured: whole rows, not 80 columns of wrapped cells
        console = Console(width=max(console.width, 200))
    console.print(table)
