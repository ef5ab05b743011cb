"""The subject-learning method names: the one list that the train config, the CLI, the pipelines' steps and the KFP
client check against.

Apart from :mod:`customcrafter.training.config` (which imports torch through the augmentation config) so that
``customcrafter pipeline submit/schedule`` can check a ``methods`` list before any request without loading torch.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

__all__ = ["Method", "METHODS", "check_methods"]

Method = Literal[
    "customcrafter", "custom_diffusion", "custom_diffusion_long", "dreamvideo", "dreamvideo_long"
]
METHODS: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]


def check_methods(methods: Any, argument: str = "methods") -> list[str]:
    """``methods`` as a list when it is a non-empty list of known method names (:data:`METHODS`), each once; else a
    ValueError naming ``argument`` (e.g. ``--methods``), the bad value and the allowed names.

    A duplicate is an error: the pipeline would train the same subject and method twice at once, into the same
    checkpoint folder and the same MLflow run name.
    """
    allowed = f"allowed: {', '.join(METHODS)}"
    if isinstance(methods, str) or not isinstance(methods, list | tuple):
        raise ValueError(f"{argument}: expected a list of method names, got {methods!r} ({allowed})")
    if not methods:
        raise ValueError(f"{argument}: no method given ({allowed})")
    if unknown := [m for m in methods if m not in METHODS]:
        raise ValueError(f"{argument}: unknown method {', '.join(map(repr, unknown))} ({allowed})")
    if repeated := [m for m, count in Counter(methods).items() if count > 1]:
        raise ValueError(
            f"{argument}: {', '.join(map(repr, repeated))} given more than once (each method trains "
            "once per subject)"
        )
    return list(methods)
