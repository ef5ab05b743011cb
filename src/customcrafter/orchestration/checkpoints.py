"""Pipeline checkpoints on the model cache: where a train step keeps them, and pruning what failed runs leave.

A cluster run's train step checkpoints to ``<cache>/checkpoints/<KFP job id>/<subject>/<method>`` (so a retried pod
resumes); a finished run removes its own, a run that failed for good leaves its job folder behind.
:func:`prune_checkpoints` removes job folders nothing has written to for a while, and nothing else.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["PrunedJob", "job_checkpoints_dir", "parse_duration", "prune_checkpoints"]

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True)
class PrunedJob:
    """A job folder removed (or, in a dry run, to be removed): its size and how long since anything was written."""

    path: Path
    size: int  # bytes
    age: timedelta
    error: str | None = None  # why it could not be removed (e.g. files of another user); None when it was


def job_checkpoints_dir(pipeline_job: str, subject: str, method: str, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/checkpoints/<job>/<subject>/<method>`` (cache: ``loading.default_cache_dir()`` unless given)."""
    from customcrafter.loading import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / "checkpoints" / pipeline_job / subject / method


def parse_duration(value: str) -> timedelta:
    """``"7d"`` → 7 days: a whole number above zero and a unit, s, m, h, d or w."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", value)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{value!r} is not a duration: a whole number above zero and a unit, s, m, h, d or w "
                         "(e.g. 7d, 12h)")
    try:
        return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:  # beyond timedelta's range (about 2.7 million years)
        raise ValueError(f"{value!r} is not a duration: too long (at most {timedelta.max.days} days)") from None


def _scan(folder: Path) -> tuple[int, float] | None:
    """(bytes of its files, newest mtime of anything) under ``folder``, links not followed; None when the folder is
    gone. Entries that vanish while scanning are left out."""
    try:
        newest, size = folder.lstat().st_mtime, 0
    except FileNotFoundError:
        return None
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            newest = max(newest, info.st_mtime)
            size += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return size, newest


def prune_checkpoints(cache_dir: str | Path | None, older_than: timedelta, dry_run: bool = False) -> list[PrunedJob]:
    """Remove the job folders under ``<cache_dir>/checkpoints`` (default cache: ``loading.default_cache_dir()``)
    whose newest file or folder is older than ``older_than``; return them (with ``dry_run``, what would go: nothing
    is removed). Links and files there are left alone; a folder that vanishes meanwhile is skipped; one that cannot
    be removed is returned with its ``error`` (a half-removed one stays under a hidden name, which the next prune
    takes) and the others are still pruned."""
    from customcrafter.loading import default_cache_dir
    from customcrafter.utils import remove_tree

    if older_than <= timedelta(0):
        raise ValueError(f"older_than must be above zero, got {older_than}")
    root = Path(cache_dir or default_cache_dir()) / "checkpoints"
    if not root.is_dir():
        return []
    now, pruned = time.time(), []
    for job in sorted(root.iterdir()):
        if job.is_symlink() or not job.is_dir():
            continue
        scanned = _scan(job)
        if scanned is None or now - scanned[1] < older_than.total_seconds():
            continue
        size, age = scanned[0], timedelta(seconds=round(now - scanned[1]))
        error = None
        if not dry_run:
            # renamed first: a pod resuming meanwhile starts afresh instead of meeting half a folder
            try:
                if not remove_tree(job, "pruned"):  # gone meanwhile (another prune took it)
                    continue
                logger.info("removed %s (%d bytes)", job, size)
            except OSError as exc:  # one folder that cannot go must not keep the others: report it, go on
                logger.warning("could not remove %s: %s", job, exc)
                error = str(exc)
        pruned.append(PrunedJob(path=job, size=size, age=age, error=error))
    return pruned
