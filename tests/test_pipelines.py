"""The Kubeflow pipelines: compiled YAML is current, the IR and platform spec carry what a cluster needs, the
components are wired to the step functions they call, and submit/schedule reach a KFP API (local stub)."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # components/ and pipelines/ live at the repository root

from cli_runner import run_cli  # noqa: E402
from kfp_stub import KfpStub  # noqa: E402

from customcrafter.orchestration import git_credentials, local_run  # noqa: E402
from customcrafter.orchestration.settings import COMPILED_DIR, PIPELINE_FILES, PROJECT_IMAGE, CompileSettings  # noqa: E402

VOLATILE = {"sdkVersion"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in VOLATILE}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, list[dict]]:
    """Both pipelines freshly compiled with the default settings: file name -> YAML documents."""
    out = tmp_path_factory.mktemp("compiled")
    paths = local_run.compile_pipelines(out, CompileSettings())
    return {p.name: _docs(p) for p in paths}


def test_committed_yaml_is_current(compiled):
    for name in PIPELINE_FILES.values():
        committed = COMPILED_DIR / name
        assert committed.is_file(), f"{committed} missing: run `customcrafter pipeline compile`"
        assert _strip(_docs(committed)) == _strip(compiled[name]), (
            f"{committed} is stale: run `customcrafter pipeline compile` and commit the result")


def _spec(docs: list[dict]) -> pipeline_spec_pb2.PipelineSpec:
    spec = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(docs[0], spec)  # fails on any field the IR schema does not know
    return spec


def _subject_dag(spec: pipeline_spec_pb2.PipelineSpec):
    return spec.components["comp-customcrafter-subject"].dag


def _named(dag, name: str):
    """The task whose taskInfo name is ``name`` (control-flow groups get numbered keys)."""
    return next(t for t in dag.tasks.values() if t.task_info.name == name)


def test_ir_structure_of_the_customcrafter_pipeline(compiled):
    spec = _spec(compiled["customcrafter_pipeline.yaml"])
    assert spec.pipeline_info.name == "customcrafter"
    params = spec.root.input_definitions.parameters
    assert {"subjects", "data_source", "data_revision", "base_model", "config_overrides", "methods", "seeds",
            "prompt_limit", "mlflow_tracking_uri", "experiment_name"} <= set(params)
    assert params["methods"].default_value.list_value.values[0].string_value == "customcrafter"
    # subjects loop -> nested per-subject pipeline
    (loop,) = spec.root.dag.tasks.values()
    assert loop.parameter_iterator.items.input_parameter.endswith("subjects")
    # validation gates the rest; methods loop inside; evaluation and registration collect every method
    subject_dag = _subject_dag(spec)
    condition = _named(subject_dag, "data-valid")
    assert condition.trigger_policy.condition == \
        "inputs.parameter_values['pipelinechannel--validate-data-Output'] == true"
    gated_dag = spec.components[condition.component_ref.name].dag
    gated = gated_dag.tasks
    loop_key = next(k for k, t in gated.items() if t.task_info.name == "methods")
    assert {"augment-data", "evaluate-methods", "register-subject", loop_key} == set(gated)
    assert gated["evaluate-methods"].inputs.artifacts["samples"].task_output_artifact.producer_task == loop_key
    assert gated["register-subject"].inputs.artifacts["subject_modules"].task_output_artifact.producer_task \
        == loop_key
    method_loop = spec.components[gated[loop_key].component_ref.name].dag.tasks
    assert set(method_loop) == {"train-subject", "sample-videos"}
    assert method_loop["sample-videos"].inputs.artifacts["subject_module"].task_output_artifact.producer_task \
        == "train-subject"
    # a failed training pod is retried, and resumes: its checkpoints are keyed by the run's id on the cache volume
    training = method_loop["train-subject"]
    assert training.retry_policy.max_retry_count == 2
    assert training.inputs.parameters["pipeline_job"].runtime_value.constant.string_value \
        == "{{$.pipeline_job_uuid}}"
    # every executor runs the project image; training asks for 4 GPUs by default
    executors = spec.deployment_spec["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {PROJECT_IMAGE}
    train = executors["exec-train-subject"]["container"]["resources"]
    assert train["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert int(train["accelerator"]["resourceCount"]) == 4


def test_platform_spec_has_gpu_cache_secrets_and_shm(compiled):
    platform = compiled["customcrafter_pipeline.yaml"][1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train = platform["exec-train-subject"]
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert train["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert [(m["constant"], m["mountPath"]) for m in train["pvcMount"]] == [("customcrafter-model-cache", "/cache")]
    assert train["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                                        "sizeLimit": "16Gi"}]
    secrets = {s["secretName"]: ({k["envVar"] for k in s["keyToEnv"]}, s["optional"]) for s in train["secretAsEnv"]}
    assert secrets["mlflow-client"] == ({"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}, False)
    assert secrets["mlflow-s3"] == ({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"}, True)
    assert secrets["customcrafter-hf"] == ({"HF_TOKEN"}, True)
    # every step that talks to MLflow or DVC gets the credentials; no secret value appears anywhere
    for name in ("exec-validate-data", "exec-evaluate-methods", "exec-register-subject"):
        assert {s["secretName"] for s in platform[name]["secretAsEnv"]} >= {"mlflow-client", "mlflow-s3"}
    retrain = compiled["retrain_new_subjects.yaml"][1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {s["secretName"] for s in retrain["exec-plan-retraining"]["secretAsEnv"]} >= {"mlflow-s3"}
    assert retrain["exec-train-subject"]["pvcMount"] == train["pvcMount"]


def test_only_the_tasks_cloning_the_data_repository_get_its_optional_git_credentials(compiled):
    """A private data repository's token (the git-credentials Secret) reaches validate and plan, which clone
    ``data_source``, as optional env (a public repository needs no Secret); no other task gets it."""
    cloning = {("customcrafter_pipeline.yaml", "exec-validate-data"),
               ("retrain_new_subjects.yaml", "exec-validate-data"),
               ("retrain_new_subjects.yaml", "exec-plan-retraining")}
    for name, docs in compiled.items():
        for executor, config in docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
            git = [s for s in config.get("secretAsEnv", []) if s["secretName"] == "git-credentials"]
            if (name, executor) not in cloning:
                assert not git, f"{name}: {executor} gets the data repository's git credentials"
                continue
            (secret,) = git
            assert secret["optional"] is True
            assert {(k["secretKey"], k["envVar"]) for k in secret["keyToEnv"]} == {
                ("GIT_TOKEN", git_credentials.GIT_TOKEN_ENV), ("GIT_USERNAME", git_credentials.GIT_USERNAME_ENV)}


def test_pipeline_pods_require_no_secret_the_base_deployment_treats_as_optional(compiled):
    """Without S3 (base/local overlays: the MLflow server's mlflow-s3 is optional, clients upload through it) the
    pipeline pods must still start: a required secretAsEnv that does not exist keeps a pod in
    CreateContainerConfigError."""
    (deploy,) = [d for d in _docs(REPO_ROOT / "k8s/base/mlflow-deployment.yaml") if d["kind"] == "Deployment"]
    optional = {source["secretRef"]["name"] for c in deploy["spec"]["template"]["spec"]["containers"]
                for source in c.get("envFrom", []) if source.get("secretRef", {}).get("optional")}
    assert "mlflow-s3" in optional
    for name, docs in compiled.items():
        for executor, config in docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
            required = {s["secretName"] for s in config.get("secretAsEnv", []) if not s.get("optional")}
            assert not required & optional, f"{name}: {executor} requires {sorted(required & optional)}"
            assert required <= {"mlflow-client"}, f"{name}: {executor} requires {sorted(required)}"


def test_train_gpus_are_a_compile_time_setting(tmp_path):
    result = run_cli(["pipeline", "compile", "-o", str(tmp_path), "--train-gpus", "8"])
    assert result == 0
    spec = _spec(_docs(tmp_path / "customcrafter_pipeline.yaml"))
    train = spec.deployment_spec["executors"]["exec-train-subject"]["container"]["resources"]
    assert int(train["accelerator"]["resourceCount"]) == 8


def test_image_and_gpu_scheduling_are_compile_time_settings(tmp_path, capsys):
    """An edited customcrafter-gpu-scheduling ConfigMap (other GPU node pools, another cache claim) and a mirrored
    image reach every task of both pipelines when recompiled, as the ConfigMap's comment and the docs say."""
    configmap = yaml.safe_load((REPO_ROOT / "k8s/base/gpu-scheduling-configmap.yaml").read_text())
    configmap["data"].update({"node-selector-key": "cloud.google.com/gke-accelerator",
                              "node-selector-value": "nvidia-h100-80gb", "model-cache-pvc": "cc-cache",
                              "model-cache-mount-path": "/cache", "toleration-key": "gpu-pool"})
    edited = tmp_path / "gpu-scheduling.yaml"
    edited.write_text(yaml.safe_dump(configmap))
    mirror = "registry.internal/customcrafter/customcrafter:0.1.0"
    out = tmp_path / "compiled"
    assert run_cli(["pipeline", "compile", "-o", str(out), "--gpu-scheduling", str(edited), "--image", mirror]) == 0
    for name in PIPELINE_FILES.values():
        docs = _docs(out / name)
        assert {e["container"]["image"] for e in docs[0]["deploymentSpec"]["executors"].values()} == {mirror}, name
        platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        for executor in ("exec-train-subject", "exec-sample-videos", "exec-evaluate-methods"):
            assert platform[executor]["nodeSelector"]["labels"] == {
                "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}, (name, executor)
            assert [t["key"] for t in platform[executor]["tolerations"]] == ["gpu-pool"], (name, executor)
            assert [m["constant"] for m in platform[executor]["pvcMount"]] == ["cc-cache"], (name, executor)
    assert run_cli(["pipeline", "compile", "-o", str(out), "--image", "ghcr.io/customcrafter/customcrafter:latest"]) \
        == 2
    assert "--image" in capsys.readouterr().err
    assert run_cli(["pipeline", "compile", "-o", str(out), "--gpu-scheduling", str(tmp_path / "missing.yaml")]) == 2
    assert "--gpu-scheduling" in capsys.readouterr().err


def test_compile_settings_image_is_not_ignored(tmp_path):
    mirror = "registry.internal/customcrafter/customcrafter:0.1.0"
    for path in local_run.compile_pipelines(tmp_path, CompileSettings(image=mirror)):
        executors = _docs(path)[0]["deploymentSpec"]["executors"]
        assert {e["container"]["image"] for e in executors.values()} == {mirror}, path.name


def test_bad_train_gpus_name_the_option_or_variable_and_write_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "compiled"
    assert run_cli(["pipeline", "compile", "-o", str(out), "--train-gpus", "-2"]) == 2
    assert "--train-gpus" in capsys.readouterr().err
    monkeypatch.setenv("CUSTOMCRAFTER_TRAIN_GPUS", "four")
    assert run_cli(["pipeline", "compile", "-o", str(out)]) == 2
    assert "CUSTOMCRAFTER_TRAIN_GPUS: 'four' is not a GPU count" in capsys.readouterr().err
    assert not out.exists()


def test_retrain_pipeline_trains_only_the_planned_subjects(compiled):
    spec = _spec(compiled["retrain_new_subjects.yaml"])
    assert spec.pipeline_info.name == "retrain-new-subjects"
    tasks = spec.root.dag.tasks
    loop = next(t for name, t in tasks.items() if name.startswith("for-loop"))
    assert loop.parameter_iterator.items.input_parameter.endswith("plan-retraining-Output")
    assert "plan-retraining" in loop.dependent_tasks
    inner = spec.components[loop.component_ref.name].dag.tasks
    assert [t.component_ref.name for t in inner.values()] == ["comp-customcrafter-subject"]


# ------------------------------------------------------------------------ components call real steps
def _component_modules():
    import components

    return [getattr(components, name) for name in components.__all__]


@pytest.mark.parametrize("component", _component_modules(), ids=lambda c: c.name)
def test_component_is_a_thin_wrapper_over_an_existing_step(component):
    """Each component imports one ``*_step`` from local_run and calls it with keywords that step accepts."""
    source = inspect.getsource(component.python_func)
    tree = ast.parse(source.lstrip())
    func = tree.body[0]
    imports = [n for n in ast.walk(func) if isinstance(n, ast.ImportFrom)]
    assert [(i.module, [a.name for a in i.names]) for i in imports] == [
        ("customcrafter.orchestration.local_run", [imports[0].names[0].name])]
    step_name = imports[0].names[0].name
    step = getattr(local_run, step_name)
    calls = [n for n in ast.walk(func) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == step_name]
    assert len(calls) == 1
    accepted = set(inspect.signature(step).parameters)
    passed = {k.arg for k in calls[0].keywords}
    assert passed == accepted, f"{component.name} passes {sorted(passed)} but {step_name} takes {sorted(accepted)}"
    # no control flow in a component: it calls, copies metadata, logs metrics, returns
    assert not [n for n in ast.walk(func) if isinstance(n, ast.If | ast.While | ast.Try)]


# ------------------------------------------------------------------------------ parameters and CLI
def test_pipeline_arguments_parse_cli_parameters():
    args = local_run.pipeline_arguments([
        "subject=dog", "methods=customcrafter,dreamvideo", "seeds=[0, 1]", "prompt_limit=2",
        "config_overrides={\"train.steps\": 400}", "base_model=VideoCrafter/VideoCrafter2"])
    assert args == {"subjects": ["dog"], "methods": ["customcrafter", "dreamvideo"], "seeds": [0, 1],
                    "prompt_limit": 2, "config_overrides": ["train.steps=400"],
                    "base_model": "VideoCrafter/VideoCrafter2"}
    assert local_run.pipeline_arguments(["subjects=[\"cat\",\"dog\"]"]) == {"subjects": ["cat", "dog"]}
    assert local_run.pipeline_arguments(["config_overrides=sample.num_inference_steps=25"]) == {
        "config_overrides": ["sample.num_inference_steps=25"]}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        local_run.pipeline_arguments(["subject"])
    # an override naming no config field fails here, before anything is submitted
    with pytest.raises(ValueError,
                       match=r"train\.max_train_steps.*no field 'max_train_steps'.*valid fields:.*steps"):
        local_run.pipeline_arguments(["config_overrides={\"train.max_train_steps\": 400}"])
    # a subject is a folder name on the pods: nothing that leaves data/subjects/ is submitted
    for bad in ("subject=../../x", "subjects=dog,../cat", 'subjects=["dog", "/etc"]'):
        with pytest.raises(ValueError, match=r"is not a subject name"):
            local_run.pipeline_arguments([bad])
    # credentials in a URL would be stored by KFP and shown to its users: refused, and not repeated in the message
    token = "0123456789abcdef0123456789abcdef01234567"  # a 40-character token given as the user
    for bad in ("mlflow_tracking_uri=https://bob:hunter2@mlflow.example", f"data_source=https://{token}@git.example/r",
                "data_source= https://x-access-token:hunter2@github.com/o/r.git",
                "data_source=https://ghp_hunter2@github.com/o/r.git", "data_source=https://glpat-hunter2@gitlab.com/r"):
        with pytest.raises(ValueError, match=r"carries credentials") as caught:
            local_run.pipeline_arguments([bad])
        assert "hunter2" not in str(caught.value) and token not in str(caught.value)
        # ... and the message names the Secret that carries them instead
        secret = r"Secret git-credentials \(key GIT_TOKEN" if "data_source" in bad else r"Secret mlflow-client"
        assert caught.match(secret)
    assert local_run.pipeline_arguments(["data_source=ssh://git@github.com/o/r.git",
                                         "mlflow_tracking_uri=http://mlflow:5000"]) == {
        "data_source": "ssh://git@github.com/o/r.git", "mlflow_tracking_uri": "http://mlflow:5000"}
    # the clone URLs that Bitbucket and Azure DevOps hand out carry the account name, no secret: allowed
    for url in ("https://alice@bitbucket.org/team/data.git", "https://myorg@dev.azure.com/myorg/p/_git/data"):
        assert local_run.pipeline_arguments([f"data_source={url}"]) == {"data_source": url}
    # the run section is run-local's own: a cluster run would ignore it, so submitting it is an error
    with pytest.raises(ValueError, match=r"run\.seeds=\[0\].*local run's.*--param seeds="):
        local_run.pipeline_arguments(["config_overrides={\"run.seeds\": [0], \"train.steps\": 4}"])


def test_overrides_route_to_their_section_and_reject_unknown_ones():
    routed = local_run.split_overrides(["train.steps=4", '{"sample.height": 64}', "run.seeds=[0]",
                                        "train.dreamvideo.inversion_steps=2", "augment.num_examples=2"])
    assert routed["train"] == ["steps=4", "dreamvideo.inversion_steps=2"]
    assert routed["sample"] == ["height=64"]
    assert routed["run"] == ["seeds=[0]"]
    assert routed["augment"] == ["num_examples=2"]
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        local_run.split_overrides(["steps=4"])
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        local_run.split_overrides(["model.lr=1"])


@pytest.mark.parametrize(("override", "message"), [
    ("train.max_train_steps=400",
     r"train \(TrainConfig\) has no field 'max_train_steps'; valid fields: .*\bsteps\b"),
    ("sample.heigth=64", r"sample \(SampleConfig\) has no field 'heigth'; valid fields: .*\bheight\b"),
    ("augment.num_exampels=2",
     r"augment \(AugmentConfig\) has no field 'num_exampels'; valid fields: .*num_examples"),
    ("evaluate.nope=1", r"evaluate \(EvalConfig\) has no field 'nope'"),
    ("run.seed=[0]", r"run \(RunOptions\) has no field 'seed'; valid fields: prompt_limit, seeds"),
    ("train.dreamvideo.steps=2", r"train\.dreamvideo \(DreamVideoConfig\) has no field 'steps'"),
    ("train.steps.max=2", r"train\.steps is not a section"),
])
def test_overrides_must_name_a_field_of_their_section_config(override, message):
    with pytest.raises(ValueError, match=message) as info:
        local_run.split_overrides([override])
    assert repr(override) in str(info.value)  # the error names the override as given


def test_every_preset_names_real_config_fields():
    from customcrafter.orchestration.settings import PRESETS

    for overrides in PRESETS.values():
        local_run.split_overrides(overrides)  # raises on a field a config lacks


@pytest.fixture
def stub():
    with KfpStub() as s:
        yield s


def test_cli_submit_sends_the_compiled_pipeline_and_parameters(stub, capsys):
    code = run_cli(["pipeline", "submit", "--host", stub.url, "--param", "subject=dog",
                      "--param", "seeds=[0]", "--param", "methods=customcrafter,custom_diffusion"])
    assert code == 0
    (run,) = stub.posted("runs")
    # with a platform spec, the client sends both documents: IR + Kubernetes settings
    sent = run.body["pipeline_spec"]
    assert sent["pipeline_spec"]["pipelineInfo"]["name"] == "customcrafter"
    train = sent["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-subject"]
    assert train["pvcMount"][0]["constant"] == "customcrafter-model-cache"
    assert run.body["runtime_config"]["parameters"] == {
        "subjects": ["dog"], "seeds": [0], "methods": ["customcrafter", "custom_diffusion"]}
    assert [e.body["display_name"] for e in stub.posted("experiments")] == ["customcrafter"]
    assert run.body["experiment_id"] == stub.state.experiments[0]["experiment_id"]
    assert "submitted run" in capsys.readouterr().out


def test_runs_use_the_pipeline_runner_service_account_of_k8s(stub):
    """Pods of a submitted or scheduled run run as the ServiceAccount k8s/ binds the least-privilege Role to (KFP
    sets it per run, the compiled YAML cannot); ``--service-account ''`` leaves KFP's default."""
    from customcrafter.orchestration.settings import PIPELINE_SERVICE_ACCOUNT

    rbac = _docs(REPO_ROOT / "k8s/base/pipeline-runner-rbac.yaml")
    (account,) = [d["metadata"]["name"] for d in rbac if d["kind"] == "ServiceAccount"]
    assert PIPELINE_SERVICE_ACCOUNT == account
    assert run_cli(["pipeline", "submit", "--host", stub.url, "--param", "subject=dog"]) == 0
    assert run_cli(["pipeline", "schedule", "--host", stub.url]) == 0
    assert run_cli(["pipeline", "submit", "--host", stub.url, "--param", "subject=dog",
                    "--service-account", "other-runner"]) == 0
    assert run_cli(["pipeline", "submit", "--host", stub.url, "--param", "subject=dog", "--service-account", ""]) == 0
    sent = [r.body.get("service_account") for r in stub.posted("runs")]
    assert sent == [account, "other-runner", None]
    (job,) = stub.posted("recurringruns")
    assert job.body["service_account"] == account


def test_cli_schedule_creates_a_recurring_retraining_run(stub, capsys):
    code = run_cli(["pipeline", "schedule", "--host", stub.url, "--cron", "0 3 * * *", "-e", "nightly",
                      "--param", "prompt_limit=2"])
    assert code == 0
    (job,) = stub.posted("recurringruns")
    assert job.body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert job.body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "retrain-new-subjects"
    assert job.body["runtime_config"]["parameters"] == {"prompt_limit": 2}
    assert [e.body["display_name"] for e in stub.posted("experiments")] == ["nightly"]
    assert "scheduled retrain-new-subjects" in capsys.readouterr().out


@pytest.mark.parametrize(("typed", "sent", "note"), [
    ("30 3 * * 1", "0 30 3 * * 1", "(typed '30 3 * * 1': KFP's cron has a seconds field first, so '0 ' was prefixed)"),
    ("0 0 3 * * *", "0 0 3 * * *", None),
    ("@DAILY", "@daily", "(typed '@DAILY')"),
])
def test_cli_schedule_prints_the_cron_it_sent(stub, capsys, typed, sent, note):
    assert run_cli(["pipeline", "schedule", "--host", stub.url, "--cron", typed]) == 0
    (job,) = stub.posted("recurringruns")
    assert job.body["trigger"]["cron_schedule"]["cron"] == sent
    out = capsys.readouterr().out
    assert f"with cron {sent!r}" in out, out
    if note:
        assert note in out, out
    else:
        assert "typed" not in out, out


def test_cli_schedule_names_the_cron_option_of_a_bad_cron_before_any_request(stub, capsys):
    for typed, message in [("0 25 * * *", "--cron: cron '0 25 * * *': hour field: 25 is outside 0-23"),
                           ("* * *", "--cron: cron '* * *': expected 5 fields"),
                           ("", "--cron: cron expression is empty")]:
        assert run_cli(["pipeline", "schedule", "--host", stub.url, "--cron", typed,
                        "--param", "methods=customcrafter"]) == 2
        assert message in capsys.readouterr().err
    assert stub.requests == []


def test_cli_rejects_bad_cron_and_bad_params_without_calling_the_server(stub, capsys):
    assert run_cli(["pipeline", "schedule", "--host", stub.url, "--cron", "0 25 * * *"]) == 2
    assert "hour" in capsys.readouterr().err
    assert run_cli(["pipeline", "submit", "--host", stub.url, "--param", "subject"]) == 2
    assert not stub.posted("runs") and not stub.posted("recurringruns")


def test_cli_submit_rejects_unknown_override_fields_and_parameters_before_submitting(stub, capsys):
    code = run_cli(["pipeline", "submit", "--host", stub.url, "--param",
                      'config_overrides={"train.max_train_steps": 400}'])
    assert code == 2
    assert "no field 'max_train_steps'" in capsys.readouterr().err
    assert run_cli(["pipeline", "submit", "--host", stub.url, "--param", "subject=dog",
                      "--param", "prompt_limits=2"]) == 2
    err = capsys.readouterr().err
    assert "'prompt_limits'" in err and "prompt_limit" in err and "subjects" in err
    assert run_cli(["pipeline", "schedule", "--host", stub.url, "--param", "seed=[0]"]) == 2
    assert "'seed'" in capsys.readouterr().err
    assert stub.requests == []  # nothing reached the server, not even the health check


@pytest.mark.parametrize(("methods", "message"), [
    ("customcrafter,dreamvidoe", r"unknown method 'dreamvidoe' \(allowed: customcrafter, custom_diffusion, "
                                 r"custom_diffusion_long, dreamvideo, dreamvideo_long\)"),
    ("customcrafter,customcrafter", r"'customcrafter' given more than once"),
    ("[]", r"no method given \(allowed: customcrafter"),
    ("", r"no method given"),
])
def test_cli_submit_and_schedule_reject_bad_method_names_before_any_request(stub, capsys, methods, message):
    import re

    for command in ("submit", "schedule"):
        assert run_cli(["pipeline", command, "--host", stub.url, "--param", f"methods={methods}"]) == 2, command
        err = capsys.readouterr().err
        assert f"--param 'methods={methods}'" in err, err  # the argument as typed
        assert re.search(message, err), err
    assert stub.requests == []  # nothing reached the server, not even the health check


def test_method_names_have_one_list_and_one_check():
    from customcrafter.orchestration.settings import DEFAULT_METHODS, REGISTERED_METHOD
    from customcrafter.training import config, method_names

    assert config.METHODS is method_names.METHODS  # the train config validates against the same names
    assert method_names.check_methods(DEFAULT_METHODS) == DEFAULT_METHODS
    assert REGISTERED_METHOD in method_names.METHODS
    with pytest.raises(ValueError, match=r"^methods: expected a list of method names, got 'customcrafter'"):
        method_names.check_methods("customcrafter")


def test_train_step_refuses_an_unknown_method_before_reading_anything(tmp_path):
    # the step the train component calls: a methods list that bypassed the CLI fails here with the same message
    with pytest.raises(ValueError, match=r"^method: unknown method 'dreamvidoe' \(allowed: customcrafter"):
        local_run.train_step(subject_data=str(tmp_path / "missing"), subject_metadata={}, augmented=str(tmp_path),
                             subject="dog", method="dreamvidoe", base_model="tiny", config_overrides=[],
                             module_dir=str(tmp_path / "module"), tracking_uri="", experiment="x")


def test_cli_run_local_rejects_bad_methods_before_fetching_data(tmp_path, monkeypatch, capsys):
    def no_data(*args, **kwargs):
        raise AssertionError("the data were fetched before --methods was checked")

    monkeypatch.setattr(local_run, "_ensure_data", no_data)
    out = tmp_path / "out"
    assert run_cli(["pipeline", "run-local", "--out", str(out), "--methods", "customcrafter,customcrafter"]) == 2
    assert "--methods: 'customcrafter' given more than once" in capsys.readouterr().err
    assert run_cli(["pipeline", "run-local", "--out", str(out), "--methods", "dreamvidoe"]) == 2
    assert "--methods: unknown method 'dreamvidoe' (allowed: customcrafter" in capsys.readouterr().err
    assert not out.exists()


def test_compiled_yaml_holds_no_credentials():
    for name in PIPELINE_FILES.values():
        text = (COMPILED_DIR / name).read_text()
        for marker in ("AKIA", "password:", "secret_access_key:", "token:"):
            assert marker.lower() not in text.lower(), f"{name} contains {marker!r}"
