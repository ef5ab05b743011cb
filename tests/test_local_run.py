"""The whole pipeline on this machine (KFP SubprocessRunner, local MLflow, DVC workspace data, tiny model), then
scheduled retraining with no data change, which must train nothing.

One sample subject, two methods, the tiny preset: a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from customcrafter.orchestration import local_run  # noqa: E402

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
