"""Small helpers used across stages: atomic writes, a lock file shared across hosts, device choice, logging set-up."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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


#: file_lock's defaults: the holder refreshes its lock file every LOCK_HEARTBEAT_S seconds; a lock not refreshed for
#: LOCK_STALE_AFTER_S seconds (well above NFS's attribute caching and a loaded host's hiccups) was left by a killed
#: holder and is taken over.
LOCK_HEARTBEAT_S = 10.0
LOCK_STALE_AFTER_S = 120.0


@contextlib.contextmanager
def file_lock(path: str | Path, heartbeat: float = LOCK_HEARTBEAT_S, stale_after: float = LOCK_STALE_AFTER_S,
              poll: float = 1.0) -> Iterator[None]:
    """Hold the lock file ``path`` against other processes and hosts sharing its folder (a ReadWriteMany volume,
    maybe NFS); wait while another holds it, logging who.

    A file created with ``O_EXCL`` rather than ``fcntl``/``flock``: exclusive create is atomic on local file systems
    and NFSv3+, while byte-range locks on NFS need lockd or v4 leases that some volume drivers lack, and a lock of a
    node that vanished is held until the server's lease runs out. A file does not vanish with its holder, so the
    holder rewrites it (host, pid, start time, a beat counter) every ``heartbeat`` seconds from a daemon thread; a
    waiter that reads the same content for ``stale_after`` seconds of its own clock (no comparison of clocks across
    hosts; reading reopens the file, and NFS's close-to-open consistency shows the latest write) takes the lock over:
    its holder was killed (SIGKILL, pod eviction, a lost node). A holder that stalls for longer loses the lock.
    """
    path = Path(path)
    if stale_after <= 2 * heartbeat:
        raise ValueError(f"{path}: stale_after ({stale_after} s) must be well above heartbeat ({heartbeat} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, who = _acquire_lock(path, stale_after, poll)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, fd, who, heartbeat, stop), name=f"lock {path.name}",
                            daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.stat(path), os.fstat(fd)):  # still ours: not taken over
                os.unlink(path)
        os.close(fd)


def _acquire_lock(path: Path, stale_after: float, poll: float) -> tuple[int, str]:
    """Create ``path`` exclusively (its open descriptor, and who holds it); meanwhile wait, and take over a lock
    whose content has not changed for ``stale_after`` seconds."""
    seen, since, holder = None, 0.0, None
    me = f"host={socket.gethostname()} pid={os.getpid()} since={time.strftime('%Y-%m-%dT%H:%M:%S%z')}"
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, created_mode("file"))
        except FileExistsError:
            pass
        else:
            try:
                _write_lock(fd, me, 0)
            except BaseException:  # a full volume: no empty lock left for everyone to wait out, no descriptor open
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            return fd, me
        try:
            content = path.read_bytes()
        except FileNotFoundError:  # released meanwhile
            continue
        if content != seen:
            seen, since = content, time.monotonic()
            who = content.decode(errors="replace").split(" beat=")[0].strip() or "a process that just started"
            if who != holder:
                holder = who
                logger.info("%s: waiting for the lock held by %s", path, who)
        elif time.monotonic() - since >= stale_after:
            logger.warning("%s: the lock of %s was not refreshed for %.0f s: its holder was killed; taking it over",
                           path, holder, stale_after)
            _remove_stale_lock(path, content)
            seen = None
            continue
        time.sleep(poll)


def _remove_stale_lock(path: Path, stale: bytes) -> None:
    """Remove ``path`` if it still holds ``stale``. Checked through a hard link to the file at ``path``, which stays
    where it is: another waiter may have taken the lock over between our read and now, and its fresh lock must be
    neither moved (a third process would find the path free and take the lock too) nor put back over a newer one."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{time.time_ns()}")
    try:
        os.link(path, aside)
    except FileNotFoundError:
        return
    except OSError:  # a file system without hard links: rename aside, read, and put back a live lock
        _move_stale_lock(path, aside, stale)
        return
    try:
        if aside.read_bytes() == stale and os.path.samestat(os.stat(path), os.stat(aside)):
            os.unlink(path)
    except FileNotFoundError:  # released or taken over meanwhile
        pass
    finally:
        aside.unlink(missing_ok=True)


def _move_stale_lock(path: Path, aside: Path, stale: bytes) -> None:
    """Without hard links: rename ``path`` aside, read, and put a live lock back (a moment without a lock at
    ``path``, in which a third process may take it)."""
    try:
        path.rename(aside)
    except FileNotFoundError:
        return
    if aside.read_bytes() == stale:
        aside.unlink()
    else:
        aside.rename(path)


def _write_lock(fd: int, who: str, beat: int) -> None:
    data = f"{who} beat={beat} at={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)  # an NFS client writes back on close or fsync; the descriptor stays open


def _heartbeat(path: Path, fd: int, who: str, interval: float, stop: threading.Event) -> None:
    """Rewrite the lock every ``interval`` seconds until ``stop``, warning once if it was taken over."""
    beat, warned = 0, False
    while not stop.wait(interval):
        beat += 1
        try:
            _write_lock(fd, who, beat)
            lost = not os.path.samestat(os.stat(path), os.fstat(fd))
        except OSError:  # the volume hiccuped, or a waiter has the file aside for a moment: the next beat tells
            continue
        if lost and not warned:
            warned = True
            logger.warning("%s: this process's lock was taken over (held longer than its heartbeat showed?)", path)


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


@contextlib.contextmanager
def scoped_environ(values: dict[str, str], *, keep_set: bool = False) -> Iterator[None]:
    """``os.environ`` with ``values`` for the block (``keep_set``: only where a variable is unset, so the user's own
    setting wins), then every variable as it was: for libraries that read settings from the environment."""
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if not (keep_set and key in os.environ):
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pick_device(device: str | None = None) -> torch.device:
    """``"auto"``/None → CUDA if available, else CPU."""
    import torch  # here, not at the top: the pipeline's light steps and the CLI's registry commands import utils

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
