"""The conversion cache shared by processes and pods: one converts under a lock, the others wait and use its folder;
a lock of a killed holder is taken over and its temporary folders removed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: A process converting with a fake converter: it records its pid, and `hang` makes it stop half-way (a folder
#: written through atomic_dir) until killed. It starts once the file `go` exists, so that both start together.
_CONVERTER = r"""
import os, sys, time
from pathlib import Path

import customcrafter.convert as convert
from customcrafter.loading import converted_checkpoint_dir
from customcrafter.utils import atomic_dir, setup_logging

checkpoint, cache, log, go, mode = sys.argv[1:6]

def fake_convert(source, output, **kwargs):
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    with atomic_dir(output) as tmp:
        (tmp / "unet.safetensors").write_bytes(b"0" * 1000)
        if mode == "hang":
            print("converting", flush=True)
            time.sleep(600)
        time.sleep(3.0)  # minutes in real life: the other process arrives meanwhile (margin for a loaded CI host)
        (tmp / "model_index.json").write_text("{}")

convert.convert_checkpoint = fake_convert
setup_logging()
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.01)
print(converted_checkpoint_dir(checkpoint, cache), flush=True)
"""


def _start(tmp_path: Path, mode: str = "convert") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [tmp_path / "model.ckpt", tmp_path / "cache", tmp_path / "conversions.log", tmp_path / "go", mode]
    proc = subprocess.Popen([sys.executable, "-c", _CONVERTER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready", proc.communicate()
    return proc


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"weights")
    return path


def test_two_processes_converting_the_same_checkpoint_convert_it_once(tmp_path, checkpoint):
    """Pods sharing the cache volume used to both do the whole multi-minute conversion."""
    procs = [_start(tmp_path), _start(tmp_path)]
    (tmp_path / "go").touch()
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], results
    assert len({out.strip() for out, _ in results}) == 1  # both got the same folder
    converters = (tmp_path / "conversions.log").read_text().split()
    assert len(converters) == 1, results
    waiter = next(err for proc, (_, err) in zip(procs, results, strict=True) if str(proc.pid) != converters[0])
    assert "waiting for the lock held by host=" in waiter and f"pid={converters[0]} " in waiter, waiter
    folder = Path(results[0][0].strip())
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no lock, no temporary left


def test_a_killed_conversion_s_lock_is_taken_over_and_its_temporary_folder_removed(tmp_path, checkpoint, monkeypatch,
                                                                                     caplog):
    """SIGKILL (OOM, pod eviction) mid-conversion left its lock and GBs of `.<name>.*.tmp` in the cache forever."""
    import customcrafter.convert as convert
    from customcrafter.loading import converted_checkpoint_dir

    killed = _start(tmp_path, mode="hang")
    (tmp_path / "go").touch()
    assert killed.stdout.readline().strip() == "converting", killed.communicate()
    killed.kill()
    killed.communicate()
    converted = tmp_path / "cache" / "converted"
    left = sorted(converted.iterdir(), key=lambda p: p.suffix)
    assert [p.suffix for p in left] == [".lock", ".tmp"], left

    def fake_convert(source, output, **kwargs):
        output.mkdir()
        (output / "model_index.json").write_text(json.dumps({"converted by": "the test"}))

    monkeypatch.setattr(convert, "convert_checkpoint", fake_convert)
    caplog.set_level(logging.INFO)
    target = converted_checkpoint_dir(checkpoint, tmp_path / "cache", lock_heartbeat=0.1, lock_stale_after=1.0)
    assert json.loads((target / "model_index.json").read_text()) == {"converted by": "the test"}
    assert sorted(p.name for p in converted.iterdir()) == [target.name]  # the lock and the temporary are gone
    assert f"pid={killed.pid} " in caplog.text and "was not refreshed" in caplog.text
    assert f"removing {left[1]}, left by a conversion that was killed" in caplog.text


def test_a_live_holder_keeps_its_lock_past_the_stale_timeout(tmp_path):
    """The heartbeat keeps a lock held longer than `stale_after` from being taken over."""
    from customcrafter.utils import file_lock

    lock, events = tmp_path / "x.lock", []
    held = threading.Event()

    def holder():
        with file_lock(lock, heartbeat=0.05, stale_after=0.5, poll=0.02):
            held.set()
            time.sleep(1.5)  # three times stale_after
            events.append("holder released")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    with file_lock(lock, heartbeat=0.05, stale_after=0.5, poll=0.02):
        events.append("waiter acquired")
    thread.join()
    assert events == ["holder released", "waiter acquired"]
    assert not lock.exists()


def test_file_lock_rejects_a_stale_timeout_close_to_the_heartbeat(tmp_path):
    from customcrafter.utils import file_lock

    with pytest.raises(ValueError, match=r"x\.lock: stale_after \(1\.0 s\) must be well above heartbeat"):
        with file_lock(tmp_path / "x.lock", heartbeat=1.0, stale_after=1.0):
            pass


def test_a_lock_whose_first_write_fails_is_not_left_behind(tmp_path, monkeypatch):
    """A full volume failing the lock's first write left the empty lock file (every process, this one's retry
    included, then waited `stale_after`, 2 minutes by default) and its descriptor open."""
    import errno

    from customcrafter import utils

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    lock, fds = tmp_path / "x.lock", len(os.listdir("/proc/self/fd"))
    with monkeypatch.context() as patch:
        patch.setattr(utils.os, "fsync", full)
        with pytest.raises(OSError, match="No space left"):
            with utils.file_lock(lock, heartbeat=0.05, stale_after=60.0, poll=0.02):
                pass
    assert not lock.exists()
    assert len(os.listdir("/proc/self/fd")) == fds
    started = time.monotonic()
    with utils.file_lock(lock, heartbeat=0.05, stale_after=60.0, poll=0.02):
        assert time.monotonic() - started < 5.0


def test_a_late_takeover_leaves_the_lock_another_waiter_took_in_place(tmp_path, monkeypatch):
    """Waiters that found the same lock stale take it over one after the other. The late one renamed the winner's
    fresh lock aside to read it and then renamed it back: meanwhile a third waiter found the path free and took the
    lock, and the rename back replaced its file, so two processes held the lock (and converted, removing each
    other's temporary folders)."""
    from customcrafter import utils

    lock, stale = tmp_path / "x.lock", b"host=h pid=1 since=t beat=7 at=t\n"
    lock.write_bytes(b"host=h pid=2 since=t beat=0 at=t\n")  # the first waiter's: it took the stale lock over
    before, third = os.stat(lock), []
    read_bytes = Path.read_bytes

    def reading(self):
        if ".stale-" in self.name:  # the late waiter reads what it found at the lock path: a third one tries it
            try:
                third.append(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", reading)
    utils._remove_stale_lock(lock, stale)
    for fd in third:
        os.close(fd)
    assert not third, "the lock path was free while a process held the lock"
    assert os.path.samestat(os.stat(lock), before) and lock.read_bytes().startswith(b"host=h pid=2 ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.lock"]
    utils._remove_stale_lock(lock, lock.read_bytes())  # a lock that is stale is still removed
    assert list(tmp_path.iterdir()) == []
