"""`customcrafter sample` commands (filled in by the sample stage)."""

from customcrafter.cli import app  # noqa: F401
