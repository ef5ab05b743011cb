"""The whole pipeline on this machine (KFP SubprocessRunner, local MLflow, DVC workspace data, tiny model), then
scheduled retraining with no data change, which must train nothing.

One sample subject, two methods, the tiny preset: a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from customcrafter.orchestration import git_credentials, local_run  # noqa: E402

METRICS = ("clip_t", "clip_i", "dino_i", "temporal_consistency", "motion", "dynamic_degree")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    if not (REPO_ROOT / "data" / "subjects" / "dog").is_dir():
        pytest.fail("data/subjects/dog is missing: run `dvc pull` (README set-up)")
    out = tmp_path_factory.mktemp("local")
    lines: list[str] = []
    result = local_run.run_local(subjects=["dog"], methods=["customcrafter", "custom_diffusion"], base_model="tiny",
                                 out=out, preset="ci", data_source=REPO_ROOT, echo=lines.append)
    return result, lines


def test_local_run_leaves_videos_report_metrics_and_a_registered_champion(first_run):
    from mlflow import MlflowClient

    result, lines = first_run
    text = "\n".join(lines)
    # the preset is printed plainly, and so is the fact that the tiny model's videos are noise
    assert "preset 'ci'" in text and "train." in text
    assert "noise" in text
    assert sorted(result.trained) == ["dog/custom_diffusion", "dog/customcrafter"]
    assert result.videos and all(v.stat().st_size > 0 for v in result.videos)
    assert len(result.reports) == 1 and "<html" in result.reports[0].read_text().lower()
    assert result.reports[0].suffix == ".html"  # what the summary prints opens in a browser
    assert str(result.reports[0]) in text and result.tracking_uri in text

    client = MlflowClient(tracking_uri=result.tracking_uri, registry_uri=result.tracking_uri)
    experiment = client.get_experiment_by_name(result.experiment)
    assert experiment.artifact_location.startswith(result.out_dir.as_uri())  # artifacts under <out>, not ./mlruns
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent = runs["dog"]
    assert parent.data.tags["validation"] == "passed"
    for method in ("customcrafter", "custom_diffusion"):
        child = runs[f"dog/{method}"]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id  # nested under the pipeline run
        assert set(METRICS) <= set(child.data.metrics)
        assert "train_loss" in child.data.metrics
        assert len(client.get_metric_history(child.info.run_id, "train_loss")) >= 2  # the loss curve
        assert child.data.metrics["train_seconds_per_step"] > 0  # speed, from the loop's own clock
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"samples", "subject_module", "evaluation"} <= artifacts
        assert any(p.endswith(".mp4") for p in _all_files(client, child.info.run_id, "samples"))
        assert child.data.params["method"] == method  # the resolved training config, flattened
    assert {"data_validation", "evaluation"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    version = client.get_model_version_by_alias("customcrafter-dog", "champion")
    assert client.get_model_version_by_alias("customcrafter-dog", "challenger").version == version.version
    assert version.tags["base_model_id"] == "tiny"
    assert version.tags["method"] == "customcrafter"
    assert version.tags["subject_hash"] and version.tags["data_revision"] and version.tags["git_commit"]
    assert version.run_id == runs["dog/customcrafter"].info.run_id
    assert "customcrafter-dog v1 (challenger, champion)" in result.registered["dog"]


def _all_files(client, run_id: str, path: str) -> list[str]:
    files = []
    for item in client.list_artifacts(run_id, path):
        files.extend(_all_files(client, run_id, item.path) if item.is_dir else [item.path])
    return files


def test_retraining_with_no_data_change_trains_nothing(first_run):
    from mlflow import MlflowClient

    result, _ = first_run
    lines: list[str] = []
    again = local_run.run_local(subjects=["dog"], methods=["customcrafter", "custom_diffusion"], base_model="tiny",
                                out=result.out_dir, preset="ci", data_source=REPO_ROOT, retrain=True,
                                echo=lines.append)
    assert again.trained == [] and again.videos == []
    assert "nothing (no new or changed subjects)" in "\n".join(lines)
    client = MlflowClient(tracking_uri=result.tracking_uri, registry_uri=result.tracking_uri)
    assert [str(v.version) for v in client.search_model_versions("name = 'customcrafter-dog'")] == ["1"]
    # the plan itself saw the subject as registered and unchanged
    assert local_run.plan_step(data_source=str(REPO_ROOT), data_revision="", subjects=["dog"],
                               tracking_uri=result.tracking_uri) == []
    assert local_run.plan_step(data_source=str(REPO_ROOT), data_revision="", subjects=["dog", "cat"],
                               tracking_uri=result.tracking_uri) == ["cat"]


# ------------------------------------------------------------------ subjects of a retraining (no pipeline run)
def _data_root(tmp_path: Path, broken: dict[str, str | None]) -> Path:
    """A data root with copies of the sample subjects dog and cat, plus ``broken`` folders: name -> the text of
    their subject.yaml (None: no subject.yaml at all)."""
    import shutil

    root = tmp_path / "data"
    for name in ("dog", "cat"):
        shutil.copytree(REPO_ROOT / "data" / "subjects" / name, root / "subjects" / name)
    for name, text in broken.items():
        shutil.copytree(REPO_ROOT / "data" / "subjects" / "dog", root / "subjects" / name)
        (root / "subjects" / name / "subject.yaml").unlink()
        if text is not None:
            (root / "subjects" / name / "subject.yaml").write_text(text)
    return root


def _plan(monkeypatch, root: Path, subjects: list[str]) -> list[str]:
    from customcrafter.orchestration import registry

    monkeypatch.setattr(registry, "registered_subject_versions", lambda *a, **k: {})  # nothing registered yet
    return local_run.plan_step(data_source=str(root), data_revision="", subjects=subjects, tracking_uri="unused")


def test_plan_skips_subject_folders_that_do_not_load_unless_asked_for(tmp_path, monkeypatch, caplog):
    from customcrafter.data.subjects import SubjectDataError

    root = _data_root(tmp_path, {"no_meta": None})
    with caplog.at_level("WARNING", logger=local_run.__name__):
        assert _plan(monkeypatch, root, []) == ["cat", "dog"]  # one broken folder does not block the others
    (warning,) = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert str(root / "subjects" / "no_meta") in warning and "subject.yaml" in warning
    assert _plan(monkeypatch, root, ["cat"]) == ["cat"]
    with pytest.raises(SubjectDataError, match=r"'no_meta' was asked for but cannot be loaded: .*subject\.yaml"):
        _plan(monkeypatch, root, ["dog", "no_meta"])


def test_local_retraining_without_subjects_considers_every_subject(tmp_path, monkeypatch):
    """--retrain with no --subjects passes [] (= all subjects to the planner), not the run's default ["dog"]."""
    calls: dict[str, list] = {}

    class FakePipelines:  # stands in for pipelines.* : records the subjects each pipeline is called with
        def retrain_new_subjects(self, subjects, **_):
            calls.setdefault("retrain", []).append(subjects)

        def customcrafter_pipeline(self, subjects, **_):
            calls.setdefault("run", []).append(subjects)

    for key in ("HF_HUB_OFFLINE", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "DVC_NO_ANALYTICS",
                "GX_ANALYTICS_ENABLED", "CUSTOMCRAFTER_SPOOL_DIR"):  # run_local sets defaults: restore them after
        monkeypatch.setenv(key, __import__("os").environ.get(key, str(tmp_path / "spool")))
    monkeypatch.setattr(local_run, "_import_pipeline_module", lambda module: FakePipelines())
    monkeypatch.setattr(local_run, "_ensure_experiment", lambda *a: None)
    monkeypatch.setattr(local_run, "_registered", lambda uri, subjects: {s: "" for s in subjects})
    root = _data_root(tmp_path, {})
    lines: list[str] = []
    result = local_run.run_local(base_model="not-tiny", out=tmp_path / "out", data_source=root, retrain=True,
                                 echo=lines.append)
    assert calls == {"retrain": [[]]}
    assert "over all subjects" in "\n".join(lines)
    assert sorted(result.registered) == ["cat", "dog"]  # the summary looks at every subject
    local_run.run_local(base_model="not-tiny", out=tmp_path / "out", data_source=root, echo=lines.append)
    assert calls["run"] == [["dog"]]  # a plain run keeps its default subject


def test_fetch_subject_leaves_a_bad_class_word_to_data_validation(tmp_path, caplog):
    """A class word like '1dog' must not fail the fetch (before any validation report exists): the warning names
    the source folder, and Great Expectations reports the problem."""
    from customcrafter.data.validate import validate_data

    meta = "name: bad_word\nclass_word: 1dog\ntoken: <new1>\nkind: live\n"
    root = _data_root(tmp_path, {"bad_word": meta})
    with caplog.at_level("WARNING", logger=local_run.__name__):
        out = local_run.fetch_subject(str(root), "", "bad_word", tmp_path / "fetched")
    assert (out / "subjects" / "bad_word" / "subject.yaml").read_text() == meta
    source = str(root / "subjects" / "bad_word")
    assert any(r.getMessage().startswith(source) and "1dog" in r.getMessage() for r in caplog.records)
    result = validate_data(out, subjects=["bad_word"], out_dir=tmp_path / "gx")
    assert not result.success and result.html_path.is_file()
    assert any("class_word" in line for line in result.problems["bad_word"])


@pytest.mark.parametrize("subject", ["../../outside", "/abs/outside", "dog/../../outside", ""])
def test_fetch_subject_refuses_a_subject_that_is_not_a_name(tmp_path, subject):
    """The subject (a run parameter on a cluster) names ``subjects/<name>`` in the source and in the task's output:
    ``../..`` must not copy a folder outside the data into one outside the output."""
    (tmp_path / "repo" / "data" / "subjects" / "dog").mkdir(parents=True)
    (tmp_path / "repo" / "outside").mkdir()
    (tmp_path / "repo" / "outside" / "key.txt").write_text("not data")
    out = tmp_path / "work" / "task"
    with pytest.raises(ValueError, match=r"subject: .* is not a subject name"):
        local_run.fetch_subject(str(tmp_path / "repo"), "", subject, out)
    assert not (tmp_path / "work" / "outside").exists() and not out.exists()


@pytest.fixture
def git_without_config(tmp_path, monkeypatch):
    """git and scmrepo with no user/system config (a credential helper there would answer first), no askpass and
    no token of the caller; scmrepo's cached GIT_ASKPASS is forgotten before and after."""
    from scmrepo.git.credentials import memory_helper

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    for name in ("GIT_ASKPASS", "SSH_ASKPASS", "GIT_TERMINAL_PROMPT", "GIT_CONFIG_COUNT", git_credentials.GIT_TOKEN_ENV,
                 git_credentials.GIT_USERNAME_ENV):
        monkeypatch.delenv(name, raising=False)
    memory_helper.__dict__.pop("askpass", None)
    yield
    memory_helper.__dict__.pop("askpass", None)


def _git_credential_fill(host: str = "example.com") -> subprocess.CompletedProcess:
    """What git does before it sends credentials to an https remote (``host``; nothing is contacted)."""
    return subprocess.run(["git", "credential", "fill"], input=f"protocol=https\nhost={host}\n\n",
                          capture_output=True, text=True, timeout=30, check=False)


def test_the_token_host_is_the_https_host_of_the_data_source():
    assert git_credentials.token_host("https://github.com/org/data.git") == "github.com"
    assert git_credentials.token_host("https://alice@Bitbucket.org/team/data.git") == "bitbucket.org"
    assert git_credentials.token_host("https://x:y@git.example.com:8443/data") == "git.example.com:8443"
    for source in ("git@github.com:org/data.git", "ssh://git@github.com/org/data.git", "http://github.com/org/d",
                   "/srv/data", "data"):
        assert git_credentials.token_host(source) is None, source


@pytest.mark.parametrize(("prompt", "answer"), [
    ("Username for 'https://github.com': ", "x-access-token"),
    ("Password for 'https://x-access-token@github.com': ", "TOKEN"),
    ("Password for 'https://GitHub.COM': ", "TOKEN"),  # host names are case-insensitive
    ("Password for 'https://alice@github.com/org/data.git': ", "TOKEN"),  # credential.useHttpPath
    ("Password for 'https://a@b@github.com': ", "TOKEN"),  # a user name holding an @ (git decodes %40)
    ("Username for 'https://github.com.evil.com': ", ""),
    ("Password for 'https://github.com.evil.com': ", ""),
    ("Password for 'https://evil.com/github.com': ", ""),
    ("Password for 'https://github.com@evil.com': ", ""),
    ("Password for 'https://x-access-token@evil.com': ", ""),
    ("Password for 'https://a@github.com/@evil.com': ", ""),  # user "a@github.com/" of evil.com
    ("Password for 'https://evil.com/x@github.com': ", ""),
    ("Password for 'https://github.com:8443': ", ""),
    ("Password for 'https://evil.com:443': ", ""),
    ("Password for 'http://github.com': ", ""),  # no token in clear text
    ("Password for 'ssh://github.com': ", ""),
    ("Password for 'https://github.com' ; 'https://evil.com': ", ""),
    ("Password for 'https://$(echo github.com)': ", ""),
    ("Password for 'https://`echo github.com`': ", ""),
    ("Enter passphrase for key '/root/.ssh/id_rsa': ", ""),
    ("Password: ", ""),
    ("", ""),
])
def test_the_askpass_answers_only_prompts_for_the_data_repositorys_host(prompt, answer, monkeypatch, tmp_path):
    """The real script, run by sh as git runs it: the user name and the token for the pinned host's https prompts,
    an empty line (nothing secret) for any other prompt, whatever it holds."""
    monkeypatch.setenv(git_credentials.GIT_TOKEN_ENV, "TOKEN")
    monkeypatch.delenv(git_credentials.GIT_USERNAME_ENV, raising=False)
    with git_credentials.data_repo_git("https://github.com/org/data.git"):
        askpass, env = os.environ["GIT_ASKPASS"], dict(os.environ)
    assert env[git_credentials.GIT_HOST_ENV] == "github.com"
    marker = tmp_path / "ran"
    for unsafe in ("$(touch {m})", "`touch {m}`", "'; touch {m}; '", '"; touch {m}; "'):
        env_bad = {**env, git_credentials.GIT_HOST_ENV: unsafe.format(m=marker)}
        subprocess.run(["sh", askpass, prompt], env=env_bad, capture_output=True, timeout=30, check=True)
    assert not marker.exists()  # the host is data, never code
    done = subprocess.run(["sh", askpass, prompt], env=env, capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout == f"{answer}\n" and done.stderr == ""
    # without a pinned host (outside data_repo_git, where scmrepo still calls the askpass it saw first): nothing
    env.pop(git_credentials.GIT_HOST_ENV)
    done = subprocess.run(["sh", askpass, prompt], env=env, capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout == "\n"


def test_the_askpass_pins_a_port_and_a_user_part_of_the_data_source(monkeypatch):
    monkeypatch.setenv(git_credentials.GIT_TOKEN_ENV, "TOKEN")
    with git_credentials.data_repo_git("https://alice@git.example.com:8443/team/data.git"):
        askpass, env = os.environ["GIT_ASKPASS"], dict(os.environ)

    def answer(prompt: str) -> str:
        return subprocess.run(["sh", askpass, prompt], env=env, capture_output=True, text=True, timeout=30,
                              check=True).stdout

    assert answer("Password for 'https://alice@git.example.com:8443': ") == "TOKEN\n"
    assert answer("Password for 'https://alice@git.example.com': ") == "\n"
    assert answer("Password for 'https://alice@git.example.com:443': ") == "\n"


def test_a_private_data_repository_token_reaches_git_and_dvc_from_the_environment(git_without_config, monkeypatch):
    """With GIT_TOKEN (the optional git-credentials Secret) git and scmrepo (DVC's in-process git) get the token
    through an askpass that reads it from the environment: the script holds no token, and git never prompts."""
    from scmrepo.git.credentials import Credential

    token = f"tok-{os.urandom(8).hex()}"
    monkeypatch.setenv(git_credentials.GIT_TOKEN_ENV, token)
    with git_credentials.data_repo_git("https://example.com/org/data.git"):
        assert os.environ["GIT_TERMINAL_PROMPT"] == "0"
        askpass = Path(os.environ["GIT_ASKPASS"])
        assert token not in askpass.read_text() and askpass.stat().st_mode & 0o077 == 0
        filled = _git_credential_fill()
        assert filled.returncode == 0, filled.stderr
        assert f"username=x-access-token\npassword={token}\n" in filled.stdout
        credential = Credential(url="https://example.com/org/data.git").fill()
        assert (credential.username, credential.password) == ("x-access-token", token)
        # another host (a redirect, a submodule, a DVC import of another repository) gets no token
        for host in ("example.org", "example.com.evil.com", "example.com:8443"):
            filled = _git_credential_fill(host)
            assert token not in filled.stdout and "username=x-access-token" not in filled.stdout, host
        assert Credential(url="https://evil.com/example.com/data.git").fill().password == ""
        monkeypatch.setenv(git_credentials.GIT_USERNAME_ENV, "bob")
        assert f"username=bob\npassword={token}\n" in _git_credential_fill().stdout
    assert "GIT_ASKPASS" not in os.environ and "GIT_TERMINAL_PROMPT" not in os.environ  # restored
    assert git_credentials.GIT_HOST_ENV not in os.environ
    # scmrepo keeps calling the askpass it saw first; outside the block it answers nothing
    assert Credential(url="https://example.com/org/data.git").fill().password == ""
    # without a token: no askpass of ours, and git fails at once instead of waiting for a terminal
    monkeypatch.delenv(git_credentials.GIT_TOKEN_ENV)
    with git_credentials.data_repo_git("https://example.com/org/data.git"):
        assert "GIT_ASKPASS" not in os.environ
        filled = _git_credential_fill()
    assert filled.returncode != 0 and "terminal prompts disabled" in filled.stderr


def test_an_askpass_removed_meanwhile_is_written_again_where_scmrepo_looks(git_without_config, monkeypatch):
    """scmrepo (DVC's in-process git) remembers the first GIT_ASKPASS; a script removed meanwhile (a /tmp cleaner)
    was written again under another name, so DVC's clones then got an empty user and token."""
    from scmrepo.git.credentials import Credential

    token = f"tok-{os.urandom(8).hex()}"
    monkeypatch.setenv(git_credentials.GIT_TOKEN_ENV, token)
    with git_credentials.data_repo_git("https://example.com/org/data.git"):
        first = Path(os.environ["GIT_ASKPASS"])
        assert Credential(url="https://example.com/org/data.git").fill().password == token
    first.unlink()
    with git_credentials.data_repo_git("https://example.com/org/data.git"):
        assert Path(os.environ["GIT_ASKPASS"]) == first and first.stat().st_mode & 0o777 == 0o700
        credential = Credential(url="https://example.com/org/data.git").fill()
    assert (credential.username, credential.password) == ("x-access-token", token)


def test_fetch_subject_from_a_private_git_repository_keeps_the_token_off_argv_urls_files_and_logs(
        git_without_config, tmp_path, monkeypatch, caplog):
    """fetch_subject and the data version (validate, plan) clone ``data_source`` with DVC: git, called there, gets
    the token from GIT_TOKEN; no argument, URL, fetched file or log line carries it."""
    import dvc.api
    from dvc.repo import Repo
    from scmrepo.git.credentials import Credential

    token = f"tok-{os.urandom(8).hex()}"
    monkeypatch.setenv(git_credentials.GIT_TOKEN_ENV, token)
    source = "https://github.com/org/private-data.git"
    calls: list[tuple] = []
    run = subprocess.run

    def recording_run(argv, *args, **kwargs):
        calls.append(("subprocess", argv, args, {k: v for k, v in kwargs.items() if k != "env"}))
        return run(argv, *args, **kwargs)

    def as_git_would(*args, **kwargs):
        """DVC's clone: git asks for credentials (the real git program, its output as a fetched file), for the
        data repository's host and, as a redirect or a submodule would, for another one."""
        calls.append(("dvc", args, kwargs))
        filled = _git_credential_fill("github.com")
        assert filled.returncode == 0 and f"password={token}" in filled.stdout, filled.stderr
        elsewhere = _git_credential_fill("gitlab.com")
        assert token not in elsewhere.stdout and "password=\n" in elsewhere.stdout, elsewhere.stderr
        assert Credential(url="https://github.com.evil.com/org/data.git").fill().password == ""
        assert Credential(url=source).fill().password == token
        if "out" in kwargs:
            Path(kwargs["out"]).mkdir(parents=True, exist_ok=True)
            (Path(kwargs["out"]) / "fetched.txt").write_text(f"fetched {args} by {os.environ.get('GIT_ASKPASS')}")
        return "outs:\n- md5: abc.dir\n"

    monkeypatch.setattr(subprocess, "run", recording_run)
    monkeypatch.setattr(Repo, "get", staticmethod(as_git_would))
    monkeypatch.setattr(dvc.api, "read", as_git_would)
    out = tmp_path / "task"
    with caplog.at_level("DEBUG"):
        local_run.fetch_subject(source, "main", "dog", out)
        version = local_run._data_version(source, "main")
    assert version == {"dvc_md5": "abc.dir", "git_revision": "main"}
    assert [c[1][0] for c in calls if c[0] == "dvc"] == [source, "data.dvc"]
    assert any(c[0] == "subprocess" and c[1][:2] == ["git", "credential"] for c in calls)
    assert token not in repr(calls)
    assert (out / "subjects" / "dog" / "fetched.txt").is_file()
    assert not any(token in p.read_text() for p in out.rglob("*") if p.is_file())
    assert token not in caplog.text


def test_an_ssh_data_source_gets_no_token(git_without_config, tmp_path, monkeypatch, caplog):
    """git@host:repo (or ssh://, or plain http://): the token goes to no host, and the log says it is unused; SSH
    needs a key, which the pipeline does not provide."""
    import dvc.api

    token = f"tok-{os.urandom(8).hex()}"
    monkeypatch.setenv(git_credentials.GIT_TOKEN_ENV, token)
    filled: list[str] = []

    def as_git_would(*args, **kwargs):
        filled.extend(_git_credential_fill(host).stdout for host in ("github.com", "example.com"))
        return "outs:\n- md5: abc.dir\n"

    monkeypatch.setattr(dvc.api, "read", as_git_would)
    with caplog.at_level("WARNING"):
        local_run._data_version("git@github.com:org/private-data.git", "main")
    assert filled and not any(token in text for text in filled)
    assert "not an https URL: the token is not used" in caplog.text and token not in caplog.text


def test_evaluation_of_a_method_whose_training_run_never_reached_mlflow_gets_its_own_run(tmp_path, monkeypatch):
    """With the server away when training opened its run, the train step passes no run id on: evaluation must
    still reach MLflow (it skipped the method before), in a run of its own, tagged as such."""
    from types import SimpleNamespace

    from mlflow import MlflowClient

    import customcrafter.evaluation.protocol as protocol

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("eval")
    trained = client.create_run(experiment_id, run_name="dog/customcrafter").info.run_id
    files = {name: tmp_path / name for name in ("report.html", "summary.md", "summary.csv", "per_video.csv")}
    for path in files.values():
        path.write_text("x")
    metrics = {"customcrafter": {"clip_t": 0.3}, "dreamvideo": {"clip_t": 0.2}}
    monkeypatch.setattr(protocol, "evaluate", lambda *a, **k: SimpleNamespace(
        metrics=metrics, num_videos=2, report_html=files["report.html"], summary_md=files["summary.md"],
        summary_csv=files["summary.csv"], per_video_csv=files["per_video.csv"]))
    samples = []
    for method, run_id in (("customcrafter", trained), ("dreamvideo", "")):
        folder = tmp_path / method
        folder.mkdir()
        (folder / "manifest.jsonl").write_text("{}\n")
        samples.append((str(folder), {"subject": "dog", "method": method, "mlflow_run_id": run_id,
                                      "mlflow_parent_run_id": ""}))
    local_run.evaluate_step(samples=samples, out_dir=str(tmp_path / "eval"), report_html=str(tmp_path / "r.html"),
                            summary_md=str(tmp_path / "s.md"), config_overrides=[], tracking_uri=uri,
                            experiment="eval")
    runs = {r.info.run_name: r for r in client.search_runs([experiment_id])}
    assert set(runs) == {"dog/customcrafter", "dog/dreamvideo"}
    assert runs["dog/customcrafter"].data.metrics == {"clip_t": 0.3}
    new = runs["dog/dreamvideo"]
    assert new.data.metrics == {"clip_t": 0.2} and new.data.tags["created_by"] == "evaluate"
    assert new.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(new.info.run_id)} == {"samples", "evaluation"}


def test_train_step_uses_the_fetched_class_images_and_the_cache_for_checkpoints(tmp_path, monkeypatch):
    """``fetch_subject`` copies ``class_images/<class>/`` next to the subject; training must use them (not generate
    a set with the base model), unless an override names other ones."""
    import shutil

    from customcrafter.training.trainer import TrainResult

    root = _data_root(tmp_path, {})
    shutil.copytree(root / "subjects" / "cat", root / "class_images" / "dog")  # any images will do
    fetched = local_run.fetch_subject(str(root), "", "dog", tmp_path / "fetched")
    used, checkpoints = [], []

    def record(config):
        used.append(config.class_images_dir)
        checkpoints.append(config.checkpoints_dir)
        return TrainResult(module_dir=tmp_path / "module", losses=[1.0], steps=1, seconds=1.0)

    monkeypatch.setattr(local_run, "run_training", record)
    step = dict(subject_data=str(fetched), subject_metadata={}, augmented=str(tmp_path), subject="dog",
                method="customcrafter", base_model="tiny", module_dir=str(tmp_path / "module"),
                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="train")
    local_run.train_step(config_overrides=[], **step)
    local_run.train_step(config_overrides=["train.class_images_dir=/elsewhere"], **step)
    assert used == [str(fetched / "class_images" / "dog"), "/elsewhere"]
    # a cluster run (its job id given) keeps checkpoints on the shared model cache, where a retried pod finds them
    monkeypatch.setenv("CUSTOMCRAFTER_CACHE", str(tmp_path / "cache"))
    local_run.train_step(config_overrides=[], pipeline_job="job-1", **step)
    assert checkpoints == [None, None, str(tmp_path / "cache" / "checkpoints" / "job-1" / "dog" / "customcrafter")]


def test_a_launched_training_worker_logs_the_run_and_returns_its_schedule(tmp_path):
    """The pipeline's multi-GPU path runs ``local_run train-worker`` under ``accelerate launch``: rank 0's INFO lines
    (the global batch, class images, resuming) must reach the pod log, and its result carries the resolved run."""
    import json
    import os
    import subprocess

    from customcrafter.training.config import TrainConfig

    config = TrainConfig(base_model="tiny", subject_dir=str(REPO_ROOT / "data" / "subjects" / "dog"),
                         method="dreamvideo", resolution=(64, 96), num_frames=2, steps=1, checkpoint_every=None,
                         output_dir=str(tmp_path / "out"), dreamvideo={"inversion_steps": 1})
    (tmp_path / "config.json").write_text(config.model_dump_json())
    worker = subprocess.run([sys.executable, "-m", "customcrafter.orchestration.local_run", "train-worker",
                             str(tmp_path / "config.json"), str(tmp_path / "result.json")], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "RANK": "0", "CUDA_VISIBLE_DEVICES": ""})
    assert worker.returncode == 0, worker.stderr[-3000:]
    assert "global batch 1 = 1 per process x 1 process(es)" in worker.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["schedule"]["stages"][1] == {"name": "identity_adapter", "steps": 1, "lr": 1e-5}


def test_multi_gpu_training_converts_the_base_model_once_before_launching(tmp_path, monkeypatch):
    """Every launched process loads the base model; the launcher downloads and converts it first, so each process
    finds the converted folder cached instead of converting it again (four full conversions on 4 GPUs)."""
    import json
    import subprocess

    import torch

    import customcrafter.loading as loading
    from customcrafter.training.config import TrainConfig

    events = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(loading, "converted_checkpoint_dir",
                        lambda path, cache_dir=None, **kwargs: events.append("convert"))

    def launch(cmd, check):
        events.append(("launch", cmd[cmd.index("--num_processes") + 1]))
        Path(cmd[-1]).write_text(json.dumps({"module_dir": str(tmp_path), "losses": [1.0], "steps": 1,
                                             "seconds": 1.0, "step_seconds": [1.0], "schedule": {}}))

    monkeypatch.setattr(subprocess, "run", launch)
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"weights")
    subject = str(REPO_ROOT / "data" / "subjects" / "dog")  # read for its token before the launch
    result = local_run.run_training(TrainConfig(base_model=str(checkpoint), subject_dir=subject))
    assert events == ["convert", ("launch", "2")] and result.losses == [1.0]


def test_run_local_refuses_unknown_methods_and_subjects_before_running(tmp_path):
    root = _data_root(tmp_path, {})
    with pytest.raises(ValueError, match=r"--methods: unknown method 'dreamvidoe' \(allowed: customcrafter"):
        local_run.run_local(methods=["customcrafter", "dreamvidoe"], out=tmp_path / "out", data_source=root)
    with pytest.raises(FileNotFoundError, match=r"--subjects: no ghost under .*subjects \(there: cat, dog"):
        local_run.run_local(subjects=["ghost"], out=tmp_path / "out", data_source=root)
    assert not (tmp_path / "out" / "kfp_root").exists()  # nothing ran


@pytest.mark.parametrize(("option", "value"), [("--methods", ","), ("--subjects", "")])
def test_run_local_refuses_an_option_that_names_nothing_instead_of_taking_the_default(tmp_path, capsys, option, value):
    from cli_runner import run_cli

    out = tmp_path / "out"
    assert run_cli(["pipeline", "run-local", option, value, "--out", str(out)]) == 2
    assert f"{option}: {value!r} names nothing" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was made
