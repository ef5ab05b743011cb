"""`customcrafter data` commands (filled in by the data stage)."""

from customcrafter.cli import app  # noqa: F401
