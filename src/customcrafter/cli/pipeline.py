"""`customcrafter pipeline` commands (filled in by the pipeline stage)."""

from customcrafter.cli import app  # noqa: F401
