"""`customcrafter train` commands (filled in by the train stage)."""

from customcrafter.cli import app  # noqa: F401
