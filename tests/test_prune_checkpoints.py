"""Pruning the checkpoint folders that failed pipeline runs leave on the model cache."""

from __future__ import annotations

import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import pytest
from cli_runner import run_cli

from customcrafter.orchestration import checkpoints
from customcrafter.orchestration.checkpoints import job_checkpoints_dir, parse_duration, prune_checkpoints

DAY = 86400


def _write(path: Path, size: int, age_days: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (time.time() - age_days * DAY,) * 2)


def _age_folders(root: Path, age_days: float) -> None:
    """Give ``root`` and the folders under it an mtime ``age_days`` ago (creating files made them new)."""
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
        os.utime(folder, (time.time() - age_days * DAY,) * 2)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def cache(tmp_path) -> Path:
    """A model cache: two failed jobs (10 and 20 days old), a job written to an hour ago, the empty folders a
    finished run leaves, and old things that are not job folders, inside checkpoints/ and beside it."""
    cache = tmp_path / "cache"
    failed = job_checkpoints_dir("failed-1", "dog", "customcrafter", cache)
    _write(failed / "step-500" / "trainable.safetensors", 3000, 10)
    _write(failed / "step-500" / "state.json", 100, 10)
    _write(job_checkpoints_dir("failed-2", "cat", "dreamvideo", cache) / "step-1000" / "state.json", 50, 20)
    running = job_checkpoints_dir("running", "dog", "customcrafter", cache)
    _write(running / "step-500" / "state.json", 100, 10)
    _write(running / "step-1000" / "state.json", 100, 1 / 24)  # an old folder, but written to recently
    (cache / "checkpoints" / "finished" / "dog").mkdir(parents=True)
    for job, age in (("failed-1", 10), ("failed-2", 20), ("running", 10), ("finished", 10)):
        _age_folders(cache / "checkpoints" / job, age)
    _write(cache / "checkpoints" / "notes.txt", 10, 30)
    outside = tmp_path / "elsewhere"
    _write(outside / "precious.bin", 10, 30)
    (cache / "checkpoints" / "linked").symlink_to(outside, target_is_directory=True)
    _write(cache / "converted" / "abc" / "unet.safetensors", 10, 30)  # the cache's other contents
    _write(cache / "class_images" / "dog" / "0.png", 10, 30)
    return cache


def test_dry_run_reports_old_job_folders_with_sizes_and_removes_nothing(cache, tmp_path):
    before = _tree(tmp_path)
    pruned = prune_checkpoints(cache, timedelta(days=7), dry_run=True)
    root = cache / "checkpoints"
    assert [(p.path, p.size) for p in pruned] == [(root / "failed-1", 3100), (root / "failed-2", 50),
                                                   (root / "finished", 0)]
    assert pruned[0].age >= timedelta(days=10) and pruned[1].age >= timedelta(days=20)
    assert _tree(tmp_path) == before


def test_prune_removes_old_job_folders_and_nothing_else(cache, tmp_path):
    before = _tree(tmp_path)
    pruned = prune_checkpoints(cache, timedelta(days=7))
    assert [p.path.name for p in pruned] == ["failed-1", "failed-2", "finished"]
    after = _tree(tmp_path)
    gone = {name for name in before if name not in after}
    assert gone and all(name.split("/")[2] in ("failed-1", "failed-2", "finished") for name in gone)
    assert {name: before[name] for name in after if name != "cache/checkpoints"} == \
        {name: value for name, value in after.items() if name != "cache/checkpoints"}
    assert sorted(p.name for p in (cache / "checkpoints").iterdir()) == ["linked", "notes.txt", "running"]
    assert (tmp_path / "elsewhere" / "precious.bin").is_file()
    # a longer threshold keeps the 10-day-old job; the recent file keeps "running" whatever the threshold
    assert prune_checkpoints(cache, timedelta(hours=2)) == []


def test_a_longer_threshold_keeps_younger_jobs(cache):
    assert [p.path.name for p in prune_checkpoints(cache, timedelta(days=15))] == ["failed-2"]
    assert (cache / "checkpoints" / "failed-1").is_dir()


def test_a_folder_that_vanishes_meanwhile_is_skipped(cache, monkeypatch):
    scan = checkpoints._scan

    def racing(folder):  # another prune (or the run's own clean-up) removes the folder right after the scan
        result = scan(folder)
        if folder.name == "failed-1":
            shutil.rmtree(folder)
        return result

    monkeypatch.setattr(checkpoints, "_scan", racing)
    assert [p.path.name for p in prune_checkpoints(cache, timedelta(days=7))] == ["failed-2", "finished"]
    assert sorted(p.name for p in (cache / "checkpoints").iterdir()) == ["linked", "notes.txt", "running"]


def test_a_folder_that_cannot_be_removed_is_reported_and_the_others_still_go(cache, monkeypatch, capsys):
    rmtree = shutil.rmtree

    def refusing(path, *args, **kwargs):  # e.g. files of another user inside the first job folder
        if "failed-1" in Path(path).name:
            raise PermissionError(13, "Permission denied", str(path))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", refusing)  # wherever the removal calls it
    jobs = {p.path.name: p.error for p in prune_checkpoints(cache, timedelta(days=7))}
    assert jobs.keys() == {"failed-1", "failed-2", "finished"} and "Permission denied" in jobs["failed-1"]
    assert jobs["failed-2"] is None and jobs["finished"] is None
    assert not (cache / "checkpoints" / "failed-2").exists() and not (cache / "checkpoints" / "finished").exists()

    (cache / "checkpoints" / "failed-3").mkdir()  # the CLI: the failure on stderr, the others removed, exit 1
    _age_folders(cache / "checkpoints" / "failed-3", 10)
    assert run_cli(["pipeline", "prune-checkpoints", "--older-than", "7d", "--cache-dir", str(cache)]) == 1
    out, err = capsys.readouterr()
    assert "removed" in out and "failed-3" in out and "could not remove" in err and "failed-1" in err

def test_no_checkpoints_folder_and_bad_durations(tmp_path):
    assert prune_checkpoints(tmp_path / "empty", timedelta(days=1)) == []
    assert parse_duration("7d") == timedelta(days=7) and parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("2w") == timedelta(weeks=2) and parse_duration("90m") == timedelta(minutes=90)
    for bad in ("7", "d", "7x", "-1d", "0d", "1.5d", "", "7 days", "99999999999w", "9" * 30 + "s"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="above zero"):
        prune_checkpoints(tmp_path, timedelta(0))


def test_cli_prune_checkpoints(cache, tmp_path, monkeypatch, capsys):
    before = _tree(tmp_path)
    for bad in ("7x", "0d", "week", "99999999999w"):
        assert run_cli(["pipeline", "prune-checkpoints", "--older-than", bad, "--cache-dir", str(cache)]) == 2
        assert f"--older-than: {bad!r} is not a duration" in capsys.readouterr().err
    assert run_cli(["pipeline", "prune-checkpoints", "--cache-dir", str(cache)]) == 2
    assert "Missing option '--older-than'" in capsys.readouterr().err
    # a mistyped --cache-dir, or a pod where the cache volume is not mounted, is an error, not "0 freed"
    assert run_cli(["pipeline", "prune-checkpoints", "--older-than", "7d", "--cache-dir", str(tmp_path / "cahce")]) == 2
    assert f"--cache-dir: {tmp_path / 'cahce'} is not a folder" in capsys.readouterr().err
    monkeypatch.setenv("CUSTOMCRAFTER_CACHE", str(tmp_path / "unmounted"))
    assert run_cli(["pipeline", "prune-checkpoints", "--older-than", "7d"]) == 2
    assert f"$CUSTOMCRAFTER_CACHE): {tmp_path / 'unmounted'} is not a folder" in capsys.readouterr().err
    assert run_cli(["pipeline", "prune-checkpoints", "--older-than", "7d", "--cache-dir", str(cache), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {cache / 'checkpoints' / 'failed-1'} (0.0 MiB, nothing written for 10 days" in out
    assert "3 job folder(s), 0.00 GiB would be freed" in out
    assert _tree(tmp_path) == before
    monkeypatch.setenv("CUSTOMCRAFTER_CACHE", str(cache))  # the default cache, as in the pods
    assert run_cli(["pipeline", "prune-checkpoints", "--older-than", "7d"]) == 0
    out = capsys.readouterr().out
    assert f"removed {cache / 'checkpoints' / 'failed-2'}" in out and "3 job folder(s), 0.00 GiB freed" in out
    assert sorted(p.name for p in (cache / "checkpoints").iterdir()) == ["linked", "notes.txt", "running"]
