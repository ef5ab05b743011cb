"""Run the ``customcrafter`` command line in-process, as a user's shell would, and return its exit status."""

from __future__ import annotations


def run_cli(argv: list[str]) -> int:
    """``customcrafter <argv>``: its exit status (0 when it returns without exiting)."""
    from customcrafter.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
