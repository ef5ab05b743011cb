"""The ``customcrafter`` command line: one subcommand per stage, each a thin wrapper over library functions.

Each stage registers its commands in its own module (``cli/<stage>.py``) through :func:`register`.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="CustomCrafter: subject-customized text-to-video on VideoCrafter2.")



@app.callback()
def _root() -> None:
    """Keep `app` a command group even while a single stage command is registered."""


# Stage modules, imported lazily-at-start so that each registers its commands on `app`.
_STAGES = ["convert", "sample", "train", "data", "evaluate", "pipeline", "models"]


def _load_stages() -> None:
    for name in _STAGES:
        importlib.import_module(f"customcrafter.cli.{name}")


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2."""


def _click_exceptions(name: str) -> tuple[type, ...]:
    """click's exception class ``name`` from click, from the copy that typer >= 0.20 vendors, and typer's own
    (``typer.Exit``, ``typer.Abort``): typer raises these, not click's."""
    found = []
    for module in ("click.exceptions", "typer._click.exceptions", "typer"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def main(argv: list[str] | None = None) -> None:
    from customcrafter.utils import setup_logging

    setup_logging(logging.INFO)
    _load_stages()
    try:
        code = app(args=argv, standalone_mode=False)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one clear line, non-zero exit
        if isinstance(exc, _click_exceptions("Exit")):
            sys.exit(exc.exit_code)
        if isinstance(exc, _click_exceptions("ClickException")):  # usage errors: click's message, exit 2
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, _click_exceptions("Abort")):
            sys.exit(130)
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2 if isinstance(exc, UserError | ValueError | FileNotFoundError | FileExistsError) else 1)
    # without standalone mode click returns, not raises, a command's `typer.Exit(code)` and Ctrl-C (130)
    if isinstance(code, int) and code:
        sys.exit(code)
