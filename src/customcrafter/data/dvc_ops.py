"""The few DVC operations the data stage needs, through DVC's Python API.

``data/`` as a whole is one DVC output (``data.dvc`` at the repository root). DVC is imported lazily: it is slow to
import and most commands never touch it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["find_dvc_root", "dvc_add", "dvc_modified", "DvcError"]


class DvcError(RuntimeError):
    """A DVC operation failed; the message says which and why."""


def find_dvc_root(path: str | Path) -> Path | None:
    """The nearest folder at or above ``path`` holding a ``.dvc/`` directory, or None."""
    current = Path(path).resolve()
    for folder in (current, *current.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def dvc_add(data_root: str | Path) -> Path:
    """``dvc add <data_root>`` in its DVC repository; returns the ``.dvc`` file written (e.g. ``data.dvc``).

    Raises :class:`DvcError` when ``data_root`` is not inside a DVC repository or DVC fails.
    """
    data_root = Path(data_root).resolve()
    root = find_dvc_root(data_root)
    if root is None:
        raise DvcError(f"{data_root}: not inside a DVC repository (run `dvc init` at the repository root)")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.repo import Repo

    relative = data_root.relative_to(root)
    # Repo.add resolves paths against the process's working directory: run it from the repository root.
    previous = Path.cwd()
    dvc_logger = logging.getLogger("dvc")
    level = dvc_logger.level
    dvc_logger.setLevel(logging.WARNING)  # its "git add data.dvc" hints duplicate the next steps we print
    try:
        os.chdir(root)
        with Repo(str(root)) as repo:
            repo.add([str(relative)])
    except Exception as exc:  # noqa: BLE001 - DVC raises many types; one clear message is what the user needs
        raise DvcError(f"dvc add {relative} failed in {root}: {exc}") from exc
    finally:
        os.chdir(previous)
        dvc_logger.setLevel(level)
    dvc_file = root / f"{relative}.dvc"
    logger.info("dvc add %s -> %s", relative, dvc_file)
    return dvc_file


def dvc_modified(dvc_file: str | Path) -> bool | None:
    """Whether the workspace differs from what ``dvc_file`` records (``dvc status <dvc_file>`` is not empty);
    None when that cannot be told (no DVC repository, or DVC fails)."""
    dvc_file = Path(dvc_file).resolve()
    root = find_dvc_root(dvc_file.parent)
    if root is None or not dvc_file.is_file():
        return None
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            return bool(repo.status(targets=[str(dvc_file)]))
    except Exception as exc:  # noqa: BLE001 - a version label must not stop the run; the log says why it is unknown
        logger.warning("dvc status %s failed: %s", dvc_file, exc)
        return None
