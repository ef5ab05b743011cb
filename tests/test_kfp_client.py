"""Submission and scheduling against a local stub of the KFP API: what reaches the server is what we meant."""

# No `from __future__ import annotations`: kfp reads the component's real annotations.
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl
from kfp_stub import KfpStub

from customcrafter.orchestration import kfp_client
from customcrafter.orchestration.kfp_client import (
    CronError,
    KfpError,
    apply_gpu_scheduling,
    gpu_scheduling_from_configmap,
    schedule_retraining,
    submit_run,
    to_kfp_cron,
)

REPO = Path(__file__).resolve().parents[1]


@dsl.component(base_image="python:3.11-slim")
def _echo(subject: str) -> str:
    return subject


@dsl.pipeline(name="tiny-pipeline")
def _tiny_pipeline(subject: str = "dog", steps: int = 1):
    _echo(subject=subject)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pkg") / "tiny_pipeline.yaml"
    compiler.Compiler().compile(_tiny_pipeline, str(path))
    return path


@pytest.fixture
def stub():
    with KfpStub() as s:
        yield s


def _runtime_params(body: dict) -> dict:
    return body["runtime_config"]["parameters"]


def test_submit_run_sends_spec_parameters_and_experiment(stub, package, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", "token-from-env")
    run_id = submit_run(stub.url, package, {"subject": "cat", "steps": 3}, experiment="cc-exp", run_name="r1")

    experiments = stub.posted("experiments")
    assert [e.body["display_name"] for e in experiments] == ["cc-exp"]
    (run,) = stub.posted("runs")
    assert run_id in stub.state.runs and run_id != ""
    assert run.body["display_name"] == "r1"
    assert run.body["experiment_id"] == stub.state.experiments[0]["experiment_id"]
    assert _runtime_params(run.body) == {"subject": "cat", "steps": 3}
    assert run.body["pipeline_spec"]["pipelineInfo"]["name"] == "tiny-pipeline"
    assert run.headers.get("authorization") == "Bearer token-from-env"


def test_submit_reuses_existing_experiment(stub, package):
    submit_run(stub.url, package, {"subject": "a"})
    submit_run(stub.url, package, {"subject": "b"})
    assert len(stub.posted("experiments")) == 1
    assert [_runtime_params(r.body)["subject"] for r in stub.posted("runs")] == ["a", "b"]


def test_submit_and_schedule_reject_parameters_the_pipeline_lacks(stub, package):
    # a name the compiled package's root inputDefinitions lack would be ignored or refused by the server
    with pytest.raises(ValueError,
                       match=r"tiny_pipeline.yaml has no parameter 'subjects'; its parameters: steps, subject"):
        submit_run(stub.url, package, {"subjects": ["dog"], "steps": 1})
    with pytest.raises(ValueError, match=r"no parameter 'nope', 'sujbect'"):
        schedule_retraining(stub.url, package, "0 3 * * *", arguments={"sujbect": "dog", "nope": 1})
    assert stub.requests == []


def test_submit_and_schedule_reject_values_of_the_wrong_type(stub, package):
    # the server takes any value; the run would fail later when its driver reads `steps` as an integer
    with pytest.raises(ValueError, match=r"arguments: steps='abc' is not an integer, as tiny_pipeline.yaml "
                                         r"declares it \(NUMBER_INTEGER\)"):
        submit_run(stub.url, package, {"steps": "abc"})
    with pytest.raises(ValueError, match=r"arguments: subject=\['dog'\] is not a string"):
        schedule_retraining(stub.url, package, "0 3 * * *", arguments={"subject": ["dog"]})
    with pytest.raises(ValueError, match=r"steps=True is not an integer"):
        submit_run(stub.url, package, {"steps": True})
    assert stub.requests == []


# the production pipeline's two list parameters; KFP reads their defaults from the signature, hence B006
@dsl.pipeline(name="list-params-pipeline")
def _list_params_pipeline(subjects: list = ["dog"], methods: list = ["customcrafter"]):  # noqa: B006
    _echo(subject="x")


@pytest.fixture(scope="module")
def list_package(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kfp") / "list_params_pipeline.yaml"
    compiler.Compiler().compile(_list_params_pipeline, str(path))
    return path


def test_submit_hints_at_subjects_for_the_subject_shorthand(stub, list_package):
    with pytest.raises(ValueError, match=r"no parameter 'subject' .*subjects=\[\"dog\"\].*its parameters: methods, "
                                         r"subjects"):
        submit_run(stub.url, list_package, {"subject": "dog"})
    assert stub.requests == []


def test_schedule_retraining_converts_cron_and_records_settings(stub, package):
    job_id = schedule_retraining(stub.url, package, "30 3 * * 1", experiment="retrain",
                                 job_name="nightly", arguments={"subject": "all"}, max_concurrency=1)
    (job,) = stub.posted("recurringruns")
    assert job_id in stub.state.recurring_runs
    assert job.body["trigger"]["cron_schedule"]["cron"] == "0 30 3 * * 1"
    assert str(job.body["max_concurrency"]) == "1"
    assert job.body["no_catchup"] is True
    assert job.body["display_name"] == "nightly"
    assert job.body["experiment_id"] == stub.state.experiments[0]["experiment_id"]
    assert _runtime_params(job.body) == {"subject": "all"}
    assert job.body["mode"] == "ENABLE"


def test_schedule_rejects_bad_cron_before_calling_server(stub, package):
    with pytest.raises(CronError, match="hour field: 25"):
        schedule_retraining(stub.url, package, "0 25 * * *", job_name="x")
    assert stub.requests == []


@pytest.mark.parametrize(("expr", "expected"), [
    ("0 3 * * *", "0 0 3 * * *"),
    ("0 0 3 * * *", "0 0 3 * * *"),
    ("*/15 * * * MON-FRI", "0 */15 * * * MON-FRI"),
    ("0 0 9 ? * 2-6", "0 0 9 ? * 2-6"),
    ("@daily", "@daily"),
    ("@DAILY", "@daily"),
    ("0  3\t* * *", "0 0 3 * * *"),
    ("@every 6h", "@every 6h"),
])
def test_to_kfp_cron_accepts(expr, expected):
    assert to_kfp_cron(expr) == expected
    assert to_kfp_cron(expected) == expected  # the CLI prints its result and schedule_retraining sends it as it is


@pytest.mark.parametrize(("expr", "message"), [
    ("", "empty"),
    ("* * *", "expected 5 fields"),
    ("61 * * * *", "minute field: 61 is outside 0-59"),
    ("0 0 * 13 *", "month field: 13"),
    ("0 0 * * FUNDAY", "day-of-week field: 'FUNDAY'"),
    ("*/0 * * * *", "step '0'"),
    ("0 5-2 * * *", "runs backwards"),
    ("@sometimes", "unknown descriptor"),
])
def test_to_kfp_cron_rejects_with_field_named(expr, message):
    with pytest.raises(CronError, match=message):
        to_kfp_cron(expr)


def test_missing_package_and_dead_host_give_clear_errors(tmp_path, package):
    with pytest.raises(FileNotFoundError, match="pipeline_package"):
        submit_run("http://127.0.0.1:9", tmp_path / "nope.yaml", {})
    with pytest.raises(KfpError, match="127.0.0.1:9"):
        submit_run("http://127.0.0.1:9", package, {})


def test_a_file_that_is_no_compiled_pipeline_is_refused_before_the_server_is_called(stub, tmp_path):
    notes, broken = tmp_path / "notes.md", tmp_path / "broken.yaml"
    notes.write_text("# not a pipeline\n")
    broken.write_text("root: [unclosed\n")
    cases = [(notes, r"notes.md is not a compiled pipeline \(.yaml"), (broken, r"broken.yaml is not valid YAML"),
             (REPO / "k8s" / "base" / "namespace.yaml", r"namespace.yaml is not a compiled KFP pipeline")]
    for path, message in cases:
        with pytest.raises(ValueError, match=f"pipeline_package: .*{message}"):
            submit_run(stub.url, path, {})
        with pytest.raises(ValueError, match=f"pipeline_package: .*{message}"):
            schedule_retraining(stub.url, path, "0 3 * * *")
    assert stub.requests == []  # no experiment created, nothing half-submitted


def test_health(stub):
    assert kfp_client.health(stub.url)["multi_user"] is False
    assert any(r.path.endswith("/healthz") for r in stub.requests)


def _kfp_cli() -> list[str]:
    exe = shutil.which("kfp")
    return [exe] if exe else [sys.executable, "-m", "kfp.cli.__main__"]


@pytest.mark.parametrize("verb", ["create", "submit"])
def test_kfp_cli_run_create_and_submit_alias_reach_stub(stub, package, tmp_path, verb):
    env = {**os.environ, "HOME": str(tmp_path)}  # the CLI keeps a context file under ~/.config/kfp
    proc = subprocess.run(
        [*_kfp_cli(), "--endpoint", stub.url, "run", verb, "-e", "customcrafter", "-f", str(package),
         "subject=dog", "steps=2"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (run,) = stub.posted("runs")
    assert _runtime_params(run.body) == {"subject": "dog", "steps": 2}
    assert [e.body["display_name"] for e in stub.posted("experiments")] == ["customcrafter"]
    assert list(stub.state.runs)[0] in proc.stdout


def test_gpu_scheduling_mirrors_configmap_and_compiles_into_platform_spec(tmp_path):
    from_manifest = gpu_scheduling_from_configmap(REPO / "k8s/base/gpu-scheduling-configmap.yaml")
    assert from_manifest == kfp_client.DEFAULT_GPU_SCHEDULING

    @dsl.pipeline(name="gpu-pipeline")
    def gpu_pipeline(subject: str = "dog"):
        apply_gpu_scheduling(_echo(subject=subject), gpus=4)

    out = tmp_path / "gpu.yaml"
    compiler.Compiler().compile(gpu_pipeline, str(out))
    pipeline_doc, platform_doc = list(yaml.safe_load_all(out.read_text()))
    executor = next(iter(pipeline_doc["deploymentSpec"]["executors"].values()))
    accel = executor["container"]["resources"]["accelerator"]
    assert accel.get("resourceType", accel.get("type")) == "nvidia.com/gpu"
    assert str(accel.get("resourceCount", accel.get("count"))) == "4"
    k8s = next(iter(platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()))
    assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert k8s["pvcMount"][0]["mountPath"] == "/cache"


def test_submit_and_schedule_check_the_methods_argument(stub, list_package):
    path = list_package
    with pytest.raises(ValueError, match=r"^arguments: methods: unknown method 'dreamvidoe' \(allowed: customcrafter"):
        submit_run(stub.url, path, {"methods": ["customcrafter", "dreamvidoe"]})
    with pytest.raises(ValueError, match=r"^arguments: methods: 'dreamvideo' given more than once"):
        schedule_retraining(stub.url, path, "0 3 * * *", arguments={"methods": ["dreamvideo", "dreamvideo"]})
    with pytest.raises(ValueError, match=r"^arguments: methods: no method given"):
        submit_run(stub.url, path, {"methods": []})
    assert stub.requests == []
    submit_run(stub.url, path, {"methods": ["customcrafter", "dreamvideo_long"]})
    (run,) = stub.posted("runs")
    assert _runtime_params(run.body) == {"methods": ["customcrafter", "dreamvideo_long"]}
