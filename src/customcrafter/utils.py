"""Small helpers used across stages: atomic writes, device choice, logging set-up."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger("customcrafter")


def created_mode(kind: str) -> int:
    """The mode ``open``/``mkdir`` would give a new ``"file"`` or ``"dir"`` under the process's umask (0644/0755
    under the usual 022): what an atomically written output should get, since ``mkstemp``/``mkdtemp`` make them
    private (0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if kind == "dir" else 0o666) & ~mask


#: renameat2(2): ``AT_FDCWD`` and the flag that swaps two existing paths in one step (Linux 3.15+, glibc 2.28+)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
#: errors of a system or filesystem without the exchange (not a problem with the paths): fall back to two renames
_NO_EXCHANGE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's ``renameat2``, or None where there is none (not Linux, or a libc older than glibc 2.28)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap the existing paths ``a`` and ``b`` atomically; False (nothing done) where the system or the filesystem
    cannot, so the caller falls back to renames. Other errors (a path gone, permissions) raise ``OSError``."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, f"{a} <-> {b}: could not swap ({os.strerror(code)})")


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it is renamed to ``target``.

    An existing ``target`` (``overwrite``) is swapped with it in one step where the system can (Linux:
    :func:`_exchange`), so a reader always finds the old folder or the new one there, never none; elsewhere it is
    renamed aside first. On any exception the temporary folder is removed and ``target`` is left as it was.
    Without ``overwrite``, a ``target`` that another process wrote meanwhile is kept: ``FileExistsError``, and this
    folder is dropped.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists (use overwrite/--force)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, created_mode("dir"))  # mkdtemp creates 0700; outputs are ordinary folders
    appeared = f"{target}: written by another process meanwhile; kept, this copy dropped"
    try:
        yield tmp
        if target.exists() and not overwrite:
            raise FileExistsError(appeared)
        if target.exists() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds what target held
        elif target.exists():  # no atomic exchange here: for a moment there is no folder at target
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(target)
            except OSError:  # a non-empty folder appeared at target since the check above
                if target.exists() and not overwrite:
                    raise FileExistsError(appeared) from None
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_tree(path: str | Path, tag: str, ignore_errors: bool = False) -> bool:
    """Delete the folder ``path``, renamed first to a hidden ``.<name>.<tag>-<pid>-<ns>`` beside it, so that nobody
    (a resuming run, another pod) ever meets half a folder at ``path``. False when ``path`` was already gone; other
    errors are raised unless ``ignore_errors`` (the renamed leftover then stays)."""
    path = Path(path)
    doomed = path.with_name(f".{path.name}.{tag}-{os.getpid()}-{time.time_ns()}")
    try:
        path.rename(doomed)
    except FileNotFoundError:
        return False
    shutil.rmtree(doomed, ignore_errors=ignore_errors)
    return True


def file_in_the_way(folder: str | Path) -> Path | None:
    """The existing file at ``folder`` or at one of its parents that keeps ``folder`` from being a folder (None when
    there is none): checked before minutes of work whose output would go there."""
    for path in (Path(folder), *Path(folder).parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, created_mode("file"))  # mkstemp creates 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def pick_device(device: str | None = None) -> torch.device:
    """``"auto"``/None → CUDA if available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor → ``device`` without making the host wait for the GPU on CUDA (pinned memory, non-blocking copy;
    a copy from pageable memory would synchronise)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
