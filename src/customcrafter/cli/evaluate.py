"""`customcrafter evaluate` commands (filled in by the evaluate stage)."""

from customcrafter.cli import app  # noqa: F401
