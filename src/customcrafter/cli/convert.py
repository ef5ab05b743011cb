"""`customcrafter convert` commands (filled in by the convert stage)."""

from customcrafter.cli import app  # noqa: F401
