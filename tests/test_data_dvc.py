"""End to end: ingest DreamBooth subjects -> validate (GX) -> dvc add -> push -> fresh clone -> pull -> same hashes.
Also: validation of all 20 DreamBooth subjects, and failures reported per subject."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from customcrafter.data.ingest import ingest_subject
from customcrafter.data.subjects import data_version, list_subjects, subject_content_hash
from customcrafter.data.validate import validate_data

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _run(*args, cwd):
    subprocess.run(list(args), cwd=cwd, env=ENV, check=True, capture_output=True, text=True)


def _subject_table(dreambooth_dir: Path) -> list[dict]:
    return list(csv.DictReader((dreambooth_dir / "subjects.csv").open()))


def test_ingest_validate_version_push_clone_pull(tmp_path, dreambooth_dir):
    repo, remote, clone = tmp_path / "repo", tmp_path / "remote", tmp_path / "clone"
    repo.mkdir()
    _run("git", "init", "-q", cwd=repo)
    _run("dvc", "init", "-q", cwd=repo)
    _run("dvc", "remote", "add", "-d", "local", str(remote), cwd=repo)
    rows = {r["subject"]: r for r in _subject_table(dreambooth_dir)}
    for name in ("dog", "robot_toy"):
        result = ingest_subject(dreambooth_dir / name, name, rows[name]["class"], kind=rows[name]["kind"],
                                data_root=repo / "data")
        assert result.dvc_file == repo / "data.dvc"
    validation = validate_data(repo / "data", out_dir=tmp_path / "validation")
    assert validation.success, validation.problems
    assert json.loads(validation.json_path.read_text())["n_images"] == 10
    assert "Great Expectations" in validation.html_path.read_text()

    hashes = {s.name: subject_content_hash(s.dir) for s in list_subjects(repo / "data")}
    assert set(hashes) == {"dog", "robot_toy"}
    md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    _run("git", "add", "-A", cwd=repo)
    _run("git", "commit", "-qm", "data", cwd=repo)
    _run("dvc", "push", "-q", cwd=repo)
    version = data_version(repo)
    assert version.dvc_md5 == md5 and version.git_revision and len(version.git_revision) == 40

    _run("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    assert not (clone / "data").exists()
    _run("dvc", "pull", "-q", cwd=clone)
    assert {s.name: subject_content_hash(s.dir) for s in list_subjects(clone / "data")} == hashes
    status = subprocess.run(["dvc", "status", "--json"], cwd=clone, env=ENV, capture_output=True, text=True)
    assert json.loads(status.stdout) == {}  # clean after the pull
    assert data_version(clone).dvc_md5 == md5


def test_rejected_ingest_leaves_dvc_untouched(tmp_path, dreambooth_dir):
    repo = tmp_path / "repo"
    repo.mkdir()
    _run("git", "init", "-q", cwd=repo)
    _run("dvc", "init", "-q", cwd=repo)
    photos = tmp_path / "photos"
    shutil.copytree(dreambooth_dir / "cat", photos)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    from customcrafter.data.ingest import IngestError

    with pytest.raises(IngestError, match="broken.jpg"):
        ingest_subject(photos, "cat", "cat", data_root=repo / "data")
    assert not (repo / "data").exists() and not (repo / "data.dvc").exists()


def test_validate_all_dreambooth_subjects_and_report_failures(tmp_path, dreambooth_dir, caplog):
    data = tmp_path / "data"
    for row in _subject_table(dreambooth_dir):
        ingest_subject(dreambooth_dir / row["subject"], row["subject"], row["class"], kind=row["kind"],
                       data_root=data, run_dvc=False)
    start = time.perf_counter()
    with caplog.at_level(logging.INFO):
        result = validate_data(data, out_dir=tmp_path / "out")
    logging.getLogger(__name__).info("validated 20 subjects in %.1f s", time.perf_counter() - start)
    assert result.success and result.n_subjects == 20 and result.n_images == 106, result.problems

    # Break three subjects in three ways; each is reported against its subject and file.
    (data / "subjects" / "can" / "00.jpg").write_bytes(b"not a jpeg at all")
    shutil.copy(data / "subjects" / "dog" / "00.jpg", data / "subjects" / "dog2" / "99.jpg")
    meta = data / "subjects" / "clock" / "subject.yaml"
    meta.write_text(meta.read_text().replace("token: <new1>", "token: new1"))
    for extra in sorted((data / "subjects" / "red_cartoon").glob("*.jpg"))[1:]:
        extra.unlink()
    with Image.open(data / "subjects" / "cat" / "00.jpg") as image:  # an orientation the EXIF standard lacks
        exif = image.getexif()
        exif[0x0112] = 9
        image.save(data / "subjects" / "cat" / "00.jpg", exif=exif)
    result = validate_data(data, out_dir=tmp_path / "out2")
    assert not result.success
    assert set(result.problems) == {"can", "dog", "dog2", "clock", "red_cartoon", "cat"}
    # the cell as the manifest wrote it (not a float of a column with gaps), no error note on a decodable file
    assert any(p.endswith("00.jpg: exif_orientation=9 fails expect_column_values_to_be_between(exif_orientation, "
                          "{'min_value': 1, 'max_value': 8})") for p in result.problems["cat"]), result.problems["cat"]
    assert any("00.jpg" in p and "decodable" in p for p in result.problems["can"])
    assert any("sha256" in p for p in result.problems["dog2"])
    assert any("token" in p for p in result.problems["clock"])
    assert any("n_images" in p for p in result.problems["red_cartoon"])
    report = json.loads((tmp_path / "out2" / "validation.json").read_text())
    assert report["success"] is False and report["problems"] == result.problems

    # the CLI exits 1 on a failed validation (scripts and CI gate on it), 0 when the asked subjects pass
    from customcrafter.cli import main

    with pytest.raises(SystemExit) as failed:
        main(["data", "validate", "--data-root", str(data), "--out", str(tmp_path / "out3")])
    assert failed.value.code == 1
    main(["data", "validate", "--data-root", str(data), "--subject", "duck_toy", "--out", str(tmp_path / "out4")])


def test_an_interrupted_command_exits_130(tmp_path, monkeypatch):
    """Ctrl-C is not a success: `customcrafter train ... && customcrafter sample ...` must stop."""
    import customcrafter.data.subjects as subjects
    from customcrafter.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(subjects, "subject_dirs", interrupted)
    with pytest.raises(SystemExit) as stop:
        main(["data", "list", "--data-root", str(tmp_path)])
    assert stop.value.code == 130


def test_data_version_says_when_the_workspace_is_not_the_commit(tmp_path, dreambooth_dir):
    """A model trained from data that no commit holds must not be labelled with HEAD as if it were."""
    from customcrafter.orchestration.local_run import _data_version

    repo = tmp_path / "repo"
    repo.mkdir()
    _run("git", "init", "-q", cwd=repo)
    _run("dvc", "init", "-q", cwd=repo)
    ingest_subject(dreambooth_dir / "dog", "dog", "dog", data_root=repo / "data")
    _run("git", "add", "-A", cwd=repo)
    _run("git", "commit", "-qm", "data", cwd=repo)
    clean = data_version(repo)
    assert clean.modified is False and clean.label == clean.git_revision
    assert _data_version(str(repo), "")["git_revision"] == clean.git_revision

    # `data add` runs `dvc add`, so data.dvc changes but is not committed yet.
    ingest_subject(dreambooth_dir / "cat", "cat", "cat", data_root=repo / "data")
    staged = data_version(repo)
    assert staged.modified is True and staged.git_revision == clean.git_revision
    assert staged.label == f"{clean.git_revision}-dirty" and "workspace modified" in str(staged)
    assert _data_version(str(repo), "")["git_revision"] == f"{clean.git_revision}-dirty"

    _run("git", "add", "-A", cwd=repo)
    _run("git", "commit", "-qm", "cat", cwd=repo)
    assert data_version(repo).modified is False

    # An image edited in place, without `dvc add`: data.dvc is committed but no longer describes data/.
    image = next((repo / "data" / "subjects" / "cat").glob("*.jpg"))
    image.write_bytes(image.read_bytes() + b"\0")
    assert data_version(repo).label.endswith("-dirty")


def test_data_version_outside_a_repository_is_unknown_not_clean(tmp_path):
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc.dir\n  nfiles: 3\n  path: data\n")
    version = data_version(tmp_path)
    assert (version.dvc_md5, version.git_revision, version.modified, version.label) == ("abc.dir", None, None, None)


def test_list_shows_the_subjects_that_load_beside_a_broken_one_and_validate_refuses_no_data(tmp_path, dreambooth_dir,
                                                                                          capsys):
    from cli_runner import run_cli

    data = tmp_path / "data"
    ingest_subject(dreambooth_dir / "dog", "dog", "dog", data_root=data, run_dvc=False)
    (data / "subjects" / "zebra").mkdir()  # a folder without subject.yaml or images
    assert run_cli(["data", "list", "--data-root", str(data)]) == 1  # scripts notice the broken one
    out = capsys.readouterr().out
    assert "dog " in out and "zebra" in out and "does not load" in out

    empty = tmp_path / "empty"
    (empty / "subjects").mkdir(parents=True)
    assert run_cli(["data", "validate", "--data-root", str(empty), "--out", str(tmp_path / "v")]) == 1
    assert "no subjects to validate" in capsys.readouterr().out
