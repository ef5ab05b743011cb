"""The registry from the command line: `models list`, and `--subject-module models:/NAME@ALIAS` in sample commands."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from cli_runner import run_cli
from mlflow import MlflowClient
from mlflow_server import free_port
from test_registry import GOOD, MODULE_META, TAGS, module_dir, uri  # noqa: F401 - fixtures

from customcrafter.orchestration.registry import (
    RegistryLookupError,
    list_registered_versions,
    register_subject_model,
    resolve_registered_module,
)


@pytest.fixture(autouse=True)
def _no_ambient_registry(monkeypatch, tmp_path):
    """No registry from the environment unless a test sets one; resolved modules cached under tmp_path, and the
    sqlite stores' ./mlruns artifacts written there too."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUSTOMCRAFTER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the base model fails the test: errors must come before it."""
    import customcrafter.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("loaded the base model despite a bad --subject-module")

    monkeypatch.setattr(loading, "load_base_pipeline", refuse)


@pytest.fixture
def two_versions(uri, module_dir):  # noqa: F811 - the fixtures imported above
    """customcrafter-dog v1 (champion) and v2 (challenger: worse dino_i, plus a non-gate metric)."""
    register_subject_model(uri, "dog", module_dir, "tiny", GOOD, TAGS)
    worse = register_subject_model(uri, "dog", module_dir, "tiny", {**GOOD, "dino_i": 0.5, "fvd": 123.0},
                                   {**TAGS, "data_revision": "rev2"})
    assert not worse.promoted
    return uri


def _rows(text: str, name: str) -> dict[int, str]:
    """Table rows of ``name`` by version number."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) > 1 and cells[0] == name:
            rows[int(cells[1])] = line
    return rows


def test_models_list_shows_versions_aliases_method_revision_and_metrics(two_versions, capsys, monkeypatch):
    assert run_cli(["models", "list", "--tracking-uri", two_versions]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "version" in line and "aliases" in line)
    for column in ("name", "method", "base model", "data revision", "dino_i", "clip_t", "motion", "fvd"):
        assert column in header, column
    assert header.index("dino_i") < header.index("clip_t") < header.index("motion") < header.index("fvd")
    rows = _rows(out, "customcrafter-dog")
    assert sorted(rows) == [1, 2]
    assert "champion" in rows[1] and "challenger" not in rows[1] and "rev1" in rows[1]
    assert "challenger" in rows[2] and "champion" not in rows[2] and "rev2" in rows[2]
    assert all("customcrafter" in row and "tiny" in row for row in rows.values())
    assert "0.6" in rows[1] and "0.5" in rows[2] and "123" in rows[2] and "123" not in rows[1]

    # MLFLOW_TRACKING_URI when --tracking-uri is not given; --subject narrows to one model
    register_subject_model(two_versions, "cat", _cat_module(two_versions), "tiny", GOOD, TAGS)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", two_versions)
    assert run_cli(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert sorted(_rows(out, "customcrafter-dog")) == [1, 2] and sorted(_rows(out, "customcrafter-cat")) == [1]
    assert run_cli(["models", "list", "--subject", "cat"]) == 0
    out = capsys.readouterr().out
    assert not _rows(out, "customcrafter-dog") and sorted(_rows(out, "customcrafter-cat")) == [1]
    assert run_cli(["models", "list", "--subject", "bear"]) == 2
    assert "error: --subject bear: no versions of customcrafter-bear" in capsys.readouterr().err

    versions = list_registered_versions(two_versions, subject="dog")
    assert [(v.version, v.aliases, v.data_revision) for v in versions] == [(2, ("challenger",), "rev2"),
                                                                           (1, ("champion",), "rev1")]
    assert versions[0].metrics == {**GOOD, "dino_i": 0.5, "fvd": 123.0}


def _cat_module(store: str) -> Path:
    folder = Path(store.removeprefix("sqlite:///")).parent / "cat_module"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "module.json").write_text(json.dumps({**MODULE_META, "subject": "cat", "class_word": "cat"}))
    return folder


def test_models_list_without_a_registry_an_empty_one_or_an_unreachable_one(tmp_path, capsys, no_loading):
    assert run_cli(["models", "list"]) == 2
    err = capsys.readouterr().err
    assert "error: models list: no registry to read" in err and "--tracking-uri" in err and \
        "MLFLOW_TRACKING_URI" in err
    missing = f"sqlite:///{tmp_path / 'typo.db'}"
    assert run_cli(["models", "list", "--tracking-uri", missing]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "typo.db").exists()

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    MlflowClient(empty).search_registered_models()  # creates the store, with no model in it
    assert run_cli(["models", "list", "--tracking-uri", empty]) == 0
    assert "no customcrafter-* models registered at" in capsys.readouterr().out

    dead = f"http://127.0.0.1:{free_port()}"
    assert run_cli(["models", "list", "--tracking-uri", dead]) == 1
    err = capsys.readouterr().err
    assert f"error: could not read the registry at {dead}" in err and "Traceback" not in err
    model_uri = "models:/customcrafter-dog@champion"
    assert run_cli(["sample", "--base-model", "tiny", "--prompt", "x", "--out", str(tmp_path / "v.mp4"),
                    "--tracking-uri", dead, "--subject-module", model_uri]) == 1
    err = capsys.readouterr().err
    assert f"error: --subject-module {model_uri}: could not read the registry at {dead}" in err
    assert "Traceback" not in err

    port = dead.rsplit(":", 1)[1]
    with_password = f"http://ops:s3cret@127.0.0.1:{port}"  # basic auth in the URI: never printed
    assert run_cli(["models", "list", "--tracking-uri", with_password]) == 1
    err = capsys.readouterr().err
    assert f"could not read the registry at http://ops:***@127.0.0.1:{port}" in err and "s3cret" not in err


def test_resolver_downloads_only_the_subject_module_once(two_versions, module_dir, tmp_path, monkeypatch):  # noqa: F811
    import mlflow.artifacts

    champion = resolve_registered_module("models:/customcrafter-dog@champion", two_versions, tmp_path / "c")
    assert (champion.version.name, champion.version.version, champion.version.aliases) == \
        ("customcrafter-dog", 1, ("champion",))
    files = sorted(p.name for p in champion.path.iterdir())
    assert files == sorted(p.name for p in module_dir.iterdir()) == ["adapter_config.json", "module.json"]
    for name in files:
        assert (champion.path / name).read_bytes() == (module_dir / name).read_bytes()
    assert [p.name for p in (tmp_path / "c").iterdir()] == [champion.path.name]  # no temporaries, no pickle/env

    # a version by number is another folder; a second resolution downloads nothing
    second = resolve_registered_module("models:/customcrafter-dog/2", two_versions, tmp_path / "c")
    assert second.version.version == 2 and second.path != champion.path

    def offline(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", offline)
    assert resolve_registered_module("models:/customcrafter-dog@champion", two_versions, tmp_path / "c").path == \
        champion.path
    with pytest.raises(RegistryLookupError, match=r"customcrafter-dog has no alias 'best' \(aliases: challenger "
                                                  r"-> v2, champion -> v1\)"):
        resolve_registered_module("models:/customcrafter-dog@best", two_versions, tmp_path / "c")
    with pytest.raises(RegistryLookupError, match=r"customcrafter-dog has no version 9 \(versions: 1, 2\)"):
        resolve_registered_module("models:/customcrafter-dog/9", two_versions, tmp_path / "c")
    with pytest.raises(ValueError, match="expected models:/NAME@ALIAS"):
        resolve_registered_module("models:/customcrafter-dog", two_versions, tmp_path / "c")


@pytest.mark.parametrize("command", ["sample", "sample-eval-set"])
def test_sample_commands_refuse_a_bad_registry_uri_before_loading(command, two_versions, tmp_path, capsys,
                                                                  no_loading, dreambooth_dir):
    if command == "sample":
        base = ["sample", "--base-model", "tiny", "--prompt", "<new1> dog", "--out", str(tmp_path / "v.mp4")]
    else:
        base = ["sample-eval-set", "--base-model", "tiny", "--subject", str(dreambooth_dir / "dog"),
                "--class-word", "dog", "--out", str(tmp_path / "set")]
    registry = ["--tracking-uri", two_versions]
    for value, extra, expected in (
            ("models:/customcrafter-dog@champion", [], "no registry to read: give --tracking-uri URI or set "
                                                       "MLFLOW_TRACKING_URI"),
            ("models:/customcrafter-dog@best", registry, "customcrafter-dog has no alias 'best'"),
            ("models:/customcrafter-dog/7", registry, "customcrafter-dog has no version 7 (versions: 1, 2)"),
            ("models:/customcrafter-cat@champion", registry, "no registered model 'customcrafter-cat' at "),
            ("models:/customcrafter-dog", registry, "expected models:/NAME@ALIAS")):
        assert run_cli([*base, "--subject-module", value, *extra]) == 2, value
        err = capsys.readouterr().err
        assert f"error: --subject-module {value}: {expected}" in err, (value, err)
    assert not (tmp_path / "cache").exists()  # nothing downloaded for any of them


@pytest.fixture
def registered_trained_module(uri, tmp_path, dreambooth_dir):  # noqa: F811
    """A one-step CustomCrafter module of the DreamBooth dog on the tiny base model, registered as champion."""
    from customcrafter.training.config import TrainConfig
    from customcrafter.training.trainer import train

    config = TrainConfig(base_model="tiny", subject_dir=str(dreambooth_dir / "dog"), class_word="dog",
                         output_dir=str(tmp_path / "run"), resolution=(64, 96), num_frames=2, steps=1,
                         prior_preservation=False, checkpoint_every=None)
    module = train(config).module_dir
    assert register_subject_model(uri, "dog", module, "tiny", GOOD, TAGS).promoted
    return uri, module


def test_sample_a_registered_champion_on_the_tiny_model(registered_trained_module, tmp_path, capsys):
    uri, module = registered_trained_module  # noqa: F811
    out = tmp_path / "dog.mp4"
    code = run_cli(["sample", "--base-model", "tiny", "--tracking-uri", uri, "--subject-module",
                    "models:/customcrafter-dog@champion", "--prompt", "<new1> dog running", "--steps", "2",
                    "--set", "num_frames=2", "--set", "height=64", "--set", "width=96", "--device", "cpu",
                    "--out", str(out)])
    assert code == 0 and out.stat().st_size > 0
    err = capsys.readouterr().err
    assert "models:/customcrafter-dog@champion: customcrafter-dog v1 (challenger, champion) -> " in err
    assert "warning" not in err
    (cached,) = (tmp_path / "cache" / "registry").iterdir()
    assert sorted(p.name for p in cached.iterdir()) == sorted(p.name for p in module.iterdir())
    shutil.rmtree(tmp_path / "run")  # the registry's copy, not the training output, is what sampling reads
    assert run_cli(["sample", "--base-model", "tiny", "--tracking-uri", uri, "--subject-module",
                    "models:/customcrafter-dog/1", "--prompt", "<new1> dog", "--steps", "2", "--set", "num_frames=2",
                    "--set", "height=64", "--set", "width=96", "--device", "cpu", "--out", str(out), "--force"]) == 0


def test_an_evaluation_set_records_the_registered_version_and_refuses_another(registered_trained_module, tmp_path,
                                                                              capsys, monkeypatch, dreambooth_dir):
    """The manifest of `sample-eval-set --subject-module models:/...` did not say which registered model and version
    its videos came from, and a rerun into the folder from another version kept the old videos under the new
    module's name. It records name, version, the alias used and the run; another version is refused before
    loading, the same version named another way resumes."""
    import customcrafter.loading as loading
    from customcrafter.sampling import evaluation_set_rows

    uri, module = registered_trained_module  # noqa: F811
    out = tmp_path / "set"
    command = ["sample-eval-set", "--base-model", "tiny", "--tracking-uri", uri, "--subject",
               str(dreambooth_dir / "dog"), "--out", str(out), "--prompt-limit", "1", "--seed", "0", "--steps", "2",
               "--set", "num_frames=2", "--set", "height=64", "--set", "width=96", "--device", "cpu"]
    assert run_cli([*command, "--subject-module", "models:/customcrafter-dog@champion"]) == 0
    run_id = MlflowClient(uri).get_model_version("customcrafter-dog", "1").run_id
    (row,) = evaluation_set_rows(out)
    assert row["subject_module"] == {"uri": "models:/customcrafter-dog@champion", "name": "customcrafter-dog",
                                     "version": 1, "alias": "champion", "run_id": run_id}
    mark = json.loads((out / ".sampling_run.json").read_text())  # written before sampling
    assert mark == {"sampling": row["sampling"], "subject_module": row["subject_module"]}
    capsys.readouterr()

    second = register_subject_model(uri, "dog", module, "tiny", GOOD, {**TAGS, "data_revision": "rev2"})
    real_load = loading.load_base_pipeline
    monkeypatch.setattr(loading, "load_base_pipeline", lambda *a, **k: pytest.fail("loaded before the check"))
    assert run_cli([*command, "--subject-module", f"models:/customcrafter-dog/{second.version}"]) == 2
    err = capsys.readouterr().err
    assert (f"error: --subject-module models:/customcrafter-dog/{second.version}: {out}: its videos (dog/p00_s0.mp4, "
            f"...) were sampled with registered model customcrafter-dog v1 (run {run_id}), this run with "
            f"customcrafter-dog v{second.version}") in err
    assert run_cli([*command, "--subject-module", str(module)]) == 2  # a folder: its origin is not the recorded one
    assert "this run with a subject module folder" in capsys.readouterr().err
    assert evaluation_set_rows(out) == [row]  # the manifest untouched

    monkeypatch.setattr(loading, "load_base_pipeline", real_load)
    assert run_cli([*command, "--subject-module", "models:/customcrafter-dog/1"]) == 0  # the same version
    (again,) = evaluation_set_rows(out)
    assert again["subject_module"] == {**row["subject_module"], "uri": "models:/customcrafter-dog/1", "alias": None}


def test_videos_of_unrecorded_origin_leave_the_origin_unrecorded(tmp_path):
    """Kept videos sampled from a module folder or before origins were recorded: their origin is unknown, so the
    new manifest does not label them with this run's registered version (as an unrecorded dtype stays unrecorded)."""
    from customcrafter.sampling import resumed_module_origin

    origin = {"uri": "models:/customcrafter-dog/1", "name": "customcrafter-dog", "version": 1, "alias": None,
              "run_id": "r1"}
    (tmp_path / "dog").mkdir()
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"video": "dog/p00_s0.mp4"}) + "\n")
    assert resumed_module_origin(tmp_path, origin) == origin  # its video is not on disk: nothing kept
    (tmp_path / "dog" / "p00_s0.mp4").write_bytes(b"video")
    assert resumed_module_origin(tmp_path, origin) is None
    assert resumed_module_origin(tmp_path, None) is None


def test_videos_an_interrupted_run_left_leave_the_origin_unrecorded(tmp_path):
    """An interrupted run keeps its whole videos but writes no manifest; a rerun with another registered version
    sampled the rest and labelled every video, the kept ones too, with its own version."""
    from customcrafter.sampling import resumed_module_origin

    origin = {"uri": "models:/customcrafter-dog/2", "name": "customcrafter-dog", "version": 2, "alias": None,
              "run_id": "r2"}
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / ".p00_s1.abc.mp4").write_bytes(b"half")  # a video being written: not a kept one
    assert resumed_module_origin(tmp_path, origin) == origin
    (tmp_path / "dog" / "p00_s0.mp4").write_bytes(b"video of an interrupted run, from some version")
    assert resumed_module_origin(tmp_path, origin) is None  # no mark: an older run's video, origin unknown
    mark = tmp_path / ".sampling_run.json"  # what sample_evaluation_set writes before its first video
    mark.write_text(json.dumps({"subject_module": origin}))
    assert resumed_module_origin(tmp_path, dict(origin, uri="models:/customcrafter-dog@champion",
                                                 alias="champion")) is not None  # the same version, resumed
    mark.write_text(json.dumps({"subject_module": dict(origin, version=1, run_id="r1")}))
    with pytest.raises(ValueError, match=r"\(dog/p00_s0\.mp4, \.\.\.\) were sampled with registered model "
                                         r"customcrafter-dog v1 \(run r1\), this run with customcrafter-dog v2"):
        resumed_module_origin(tmp_path, origin)
    mark.write_text(json.dumps({"subject_module": None}))  # that run sampled a module folder (or unknown videos)
    assert resumed_module_origin(tmp_path, origin) is None
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"video": "dog/p00_s0.mp4", "subject_module": origin}) + "\n")
    assert resumed_module_origin(tmp_path, origin) == origin  # listed with this version: kept and recorded
