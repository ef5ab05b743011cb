"""Registry: versions, tags, challenger/champion aliases by the gate, retrain bookkeeping, the pyfunc contract."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from customcrafter.orchestration.registry import (
    GateRule,
    PromotionGate,
    register_subject_model,
    registered_subject_versions,
    subjects_to_retrain,
)

TAGS = {"data_revision": "rev1", "git_commit": "abc123", "method": "customcrafter", "subject_hash": "h-dog-1"}
GOOD = {"dino_i": 0.60, "clip_t": 0.30, "motion": 2.0}
#: the fields of a trained module's module.json that registration reads
MODULE_META = {"subject": "dog", "base_model_id": "tiny", "method": "customcrafter", "base_model_signature": "s",
               "token": "<new1>", "class_word": "dog", "fps": 16}


@pytest.fixture
def uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def module_dir(tmp_path):
    folder = tmp_path / "dog_module"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "module.json").write_text(json.dumps(MODULE_META))
    return folder


def _aliases(uri: str, name: str) -> dict[str, int]:
    return {k: int(v) for k, v in MlflowClient(uri).get_registered_model(name).aliases.items()}


def test_first_version_is_champion_then_gate_decides(uri, module_dir):
    first = register_subject_model(uri, "dog", module_dir, "tiny", GOOD, TAGS)
    assert (first.name, first.version, first.promoted) == ("customcrafter-dog", 1, True)
    assert "first version" in first.reason
    assert _aliases(uri, first.name) == {"champion": 1, "challenger": 1}

    better = register_subject_model(uri, "dog", module_dir, "tiny", {**GOOD, "dino_i": 0.65}, TAGS)
    assert better.promoted and better.version == 2
    assert _aliases(uri, first.name) == {"champion": 2, "challenger": 2}

    worse = register_subject_model(uri, "dog", module_dir, "tiny", {**GOOD, "dino_i": 0.50, "motion": 3.0}, TAGS)
    assert not worse.promoted and worse.version == 3
    assert "dino_i" in worse.reason and "champion v2" in worse.reason and "motion" not in worse.reason
    assert _aliases(uri, first.name) == {"champion": 2, "challenger": 3}


def test_registry_error_on_the_champion_lookup_is_not_taken_as_no_champion(uri, module_dir, monkeypatch):
    """A 503 while reading the champion must stop the gate, not promote a worse version as "first version"."""
    register_subject_model(uri, "dog", module_dir, "tiny", GOOD, TAGS)

    # A transient 503 right after the new version gets its challenger alias: the next read of the registry
    # (whichever way the champion is looked up) fails once; later calls, e.g. a promotion, would succeed.
    outage = []
    set_alias, get_model, get_by_alias = (MlflowClient.set_registered_model_alias,
                                          MlflowClient.get_registered_model, MlflowClient.get_model_version_by_alias)

    def set_alias_then_fail(self, name, alias, version):
        set_alias(self, name, alias, version)
        if alias == "challenger":
            outage.append(name)

    def unavailable(original):
        def call(self, name, *args, **kwargs):
            if outage:
                raise MlflowException(f"503 Service Unavailable reading {outage.pop()}",
                                      error_code=TEMPORARILY_UNAVAILABLE)
            return original(self, name, *args, **kwargs)
        return call

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_registered_model_alias", set_alias_then_fail)
        patch.setattr(MlflowClient, "get_registered_model", unavailable(get_model))
        patch.setattr(MlflowClient, "get_model_version_by_alias", unavailable(get_by_alias))
        with pytest.raises(RuntimeError, match=r"customcrafter-dog v2: could not read the champion alias.*503"):
            register_subject_model(uri, "dog", module_dir, "tiny", {**GOOD, "dino_i": 0.10}, TAGS)
    assert _aliases(uri, "customcrafter-dog") == {"champion": 1, "challenger": 2}


def test_version_tags_and_run(uri, module_dir):
    result = register_subject_model(uri, "dog", module_dir, "tiny", GOOD, TAGS)
    client = MlflowClient(uri)
    version = client.get_model_version("customcrafter-dog", str(result.version))
    for key, value in {**TAGS, "base_model_id": "tiny"}.items():
        assert version.tags[key] == value
    assert float(version.tags["metric.dino_i"]) == GOOD["dino_i"]
    run = client.get_run(result.run_id)
    assert run.data.metrics["clip_t"] == GOOD["clip_t"]
    assert client.get_registered_model("customcrafter-dog").tags["subject"] == "dog"


def test_registration_into_an_existing_pipeline_run(uri, module_dir):
    client = MlflowClient(uri)
    exp = client.create_experiment("pipeline-exp")
    run = client.create_run(exp, run_name="dog/customcrafter")
    result = register_subject_model(uri, "dog", module_dir, "tiny", GOOD, TAGS, run_id=run.info.run_id)
    assert result.run_id == run.info.run_id
    assert client.get_run(run.info.run_id).data.metrics["motion"] == GOOD["motion"]


def test_inputs_are_checked_with_named_fields(uri, module_dir, tmp_path):
    with pytest.raises(ValueError, match="tags: missing git_commit, subject_hash"):
        register_subject_model(uri, "dog", module_dir, "tiny", GOOD, {"data_revision": "r", "method": "m"})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="module_dir"):
        register_subject_model(uri, "dog", empty, "tiny", GOOD, TAGS)
    with pytest.raises(ValueError, match="subject: 'my dog'"):
        register_subject_model(uri, "my dog", module_dir, "tiny", GOOD, TAGS)
    # tags that contradict what the module was trained with are refused, not promoted
    with pytest.raises(ValueError, match=r"base_model_id: 'VideoCrafter/VideoCrafter2' given, but the module in "
                                         r".* was trained with 'tiny'"):
        register_subject_model(uri, "dog", module_dir, "VideoCrafter/VideoCrafter2", GOOD, TAGS)
    with pytest.raises(ValueError, match="method: 'dreamvideo' given"):
        register_subject_model(uri, "dog", module_dir, "tiny", GOOD, {**TAGS, "method": "dreamvideo"})
    with pytest.raises(ValueError, match="subject: 'cat' given"):
        register_subject_model(uri, "cat", module_dir, "tiny", GOOD, TAGS)
    with pytest.raises(MlflowException):
        MlflowClient(uri).get_registered_model("customcrafter-cat")


def test_gate_rules_direction_tolerance_and_missing_metrics():
    gate = PromotionGate(rules=[GateRule(metric="dino_i", tolerance=0.02),
                                GateRule(metric="fvd", higher_is_better=False)])
    assert gate.evaluate({"dino_i": 0.59, "fvd": 100}, {"dino_i": 0.60, "fvd": 100})[0]
    ok, reason = gate.evaluate({"dino_i": 0.57, "fvd": 90}, {"dino_i": 0.60, "fvd": 100})
    assert not ok and "dino_i 0.57 is not >= 0.58" in reason
    ok, reason = gate.evaluate({"dino_i": 0.7, "fvd": 120}, {"dino_i": 0.60, "fvd": 100})
    assert not ok and "fvd" in reason
    ok, reason = gate.evaluate({"fvd": 1}, {"dino_i": 0.6, "fvd": 2})
    assert not ok and "dino_i missing" in reason
    assert gate.evaluate({"dino_i": 0.1, "fvd": 1}, {"fvd": 2})[0]  # champion lacks dino_i: not comparable
    assert [r.metric for r in PromotionGate().rules] == ["dino_i", "clip_t", "motion"]
    with pytest.raises(ValueError, match="appears twice"):
        PromotionGate(rules=[GateRule(metric="a"), GateRule(metric="a")])
    with pytest.raises(ValueError, match="tolerance"):
        GateRule(metric="a", tolerance=-1)


def test_registered_versions_by_data_revision_and_subjects_to_retrain(uri, module_dir):
    register_subject_model(uri, "dog", module_dir, "tiny", GOOD, TAGS)
    register_subject_model(uri, "dog", module_dir, "tiny", GOOD, {**TAGS, "data_revision": "rev2",
                                                                   "subject_hash": "h-dog-2"})
    cat_module = module_dir.with_name("cat_module")
    shutil.copytree(module_dir, cat_module)
    (cat_module / "module.json").write_text(json.dumps({**MODULE_META, "subject": "cat", "class_word": "cat"}))
    register_subject_model(uri, "cat", cat_module, "tiny", GOOD, {**TAGS, "subject_hash": "h-cat"})

    at_rev1 = registered_subject_versions(uri, data_revision="rev1")
    assert at_rev1 == {"dog": {"version": 1, "subject_hash": "h-dog-1", "data_revision": "rev1"},
                       "cat": {"version": 1, "subject_hash": "h-cat", "data_revision": "rev1"}}
    assert registered_subject_versions(uri, data_revision="rev2") == {
        "dog": {"version": 2, "subject_hash": "h-dog-2", "data_revision": "rev2"}}
    assert registered_subject_versions(uri)["dog"]["version"] == 2

    current = {"dog": "h-dog-1", "cat": "h-cat-changed", "bear": "h-bear"}
    assert subjects_to_retrain(current, at_rev1) == ["bear", "cat"]
    assert subjects_to_retrain({"dog": "h-dog-1"}, at_rev1) == []


def test_registered_versions_follow_pages_past_the_first_hundred_models(uri, tmp_path):
    """MLflow returns 100 registered models per page; subjects past the first page must still be seen."""
    client = MlflowClient(uri)
    subjects = [f"s{i:03d}" for i in range(105)]
    for subject in subjects:
        name = f"customcrafter-{subject}"
        client.create_registered_model(name, tags={"subject": subject})
        client.create_model_version(name, source=str(tmp_path / subject),
                                    tags={"data_revision": "rev1", "subject_hash": f"h-{subject}"})
    assert client.search_registered_models().token  # more than one page, or the test proves nothing

    registered = registered_subject_versions(uri, data_revision="rev1")
    assert sorted(registered) == subjects
    assert registered["s104"] == {"version": 1, "subject_hash": "h-s104", "data_revision": "rev1"}
    assert subjects_to_retrain({s: f"h-{s}" for s in subjects}, registered) == []


def test_pyfunc_loads_base_and_module_and_returns_videos(uri, module_dir, monkeypatch):
    """The pyfunc contract, with stand-ins for loading/subject_module/sampling (exercised for real below)."""
    import mlflow.pyfunc

    calls = {}

    def load_base_pipeline(model, device=None, dtype=None):
        calls["base"], calls["device"] = model, device
        return types.SimpleNamespace(name="pipe")

    def optimize_pipeline(pipe, speed):
        calls["speed"] = speed
        assert "module_files" in calls, "the subject module must be loaded before optimising (DWVSS fuses into it)"

    def load_subject_module(pipe, path, adapter_name=None):
        calls["module_files"] = sorted(os.listdir(path))

    def sample_video(pipe, prompt, seed=0, num_frames=16, height=320, width=512, num_inference_steps=50,
                     method=None):
        calls.setdefault("samples", []).append((prompt, seed, num_frames, method))
        return np.zeros((num_frames, height, width, 3), np.uint8)

    register_subject_model(uri, "dog", module_dir, "tiny", GOOD, TAGS)  # before the stand-ins replace the modules
    for name, attrs in {"customcrafter.loading": {"load_base_pipeline": load_base_pipeline},
                        "customcrafter.subject_module": {"load_subject_module": load_subject_module},
                        "customcrafter.sampling": {"sample_video": sample_video},
                        "customcrafter.performance": {"optimize_pipeline": optimize_pipeline,
                                                      "SpeedConfig": lambda **kw: kw}}.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    model = mlflow.pyfunc.load_model("models:/customcrafter-dog@champion")
    videos = model.predict(pd.DataFrame({"prompt": ["<new1> dog runs", "<new1> dog sits"], "seed": [3, 4],
                                         "num_frames": [2, 2], "height": [8, 8], "width": [8, 8]}))
    assert calls["base"] == "tiny"
    assert calls["device"].type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert calls["speed"] == {"dtype": "bf16", "compile": "none"}
    assert calls["module_files"] == ["adapter_config.json", "module.json"]
    assert calls["samples"] == [("<new1> dog runs", 3, 2, "customcrafter"), ("<new1> dog sits", 4, 2, "customcrafter")]
    assert [v.shape for v in videos] == [(2, 8, 8, 3)] * 2


def test_the_pyfunc_model_is_imported_logged_and_loaded_without_a_type_hint_warning(tmp_path, module_dir):
    """MLflow printed 'Add type hints to the `predict` method ...' whenever the model's module was imported (every
    registration, every process loading a registered model: unpickling imports it). In a fresh process, as a user
    meets it: import and register (log_model), with every warning shown."""
    script = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("always")
        import customcrafter.orchestration.pyfunc
        from customcrafter.orchestration.registry import register_subject_model
        uri = {f"sqlite:///{tmp_path / 'fresh.db'}"!r}
        register_subject_model(uri, "dog", {str(module_dir)!r}, "tiny", {GOOD!r}, {TAGS!r})
        print("done")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parents[1] / "src"),
                                                                    os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)  # MLflow's default artifact root is ./mlruns
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-3000:]
    assert "type hint" not in done.stderr.lower(), done.stderr[-3000:]


def test_registration_logs_the_signature_with_no_input_example_warning_and_no_model_load(uri, module_dir,
                                                                                         monkeypatch):
    """MLflow warned 'An input example was not provided ...' at every registration. An example would make log_model
    load the model (the base weights) and sample a video; the version carries the explicit signature instead, the
    reminder is silenced, and nothing is loaded or predicted at log time."""
    import warnings

    import mlflow
    from mlflow.models import get_model_info

    from customcrafter.orchestration.pyfunc import CustomCrafterVideoModel, input_signature
    from customcrafter.orchestration.registry import _tracking

    called: list[str] = []
    monkeypatch.setattr(CustomCrafterVideoModel, "load_context", lambda self, context: called.append("load"))
    monkeypatch.setattr(CustomCrafterVideoModel, "predict", lambda self, *a, **k: called.append("predict"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = register_subject_model(uri, "dog", module_dir, "tiny", GOOD, TAGS)
    assert not [str(w.message) for w in caught if "input example" in str(w.message).lower()]
    assert called == []
    with _tracking(uri):
        info = get_model_info(f"models:/customcrafter-dog/{result.version}")
    assert info.signature.to_dict() == input_signature().to_dict()
    assert [c.name for c in info.signature.inputs.inputs] == ["prompt", "seed", "num_inference_steps", "num_frames",
                                                                "height", "width"]
    assert info.saved_input_example_info is None

    # the warning silenced is one this MLflow gives (else the filter is stale: drop it)
    with _tracking(uri), mlflow.start_run(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlflow.pyfunc.log_model(name="plain", python_model=CustomCrafterVideoModel(), signature=input_signature(),
                                pip_requirements=["mlflow"])
    assert any("An input example was not provided" in str(w.message) for w in caught)


def _real_model_code_missing() -> str | None:
    checks = [("customcrafter.sampling", "sample_video"), ("customcrafter.loading", "load_base_pipeline"),
              ("customcrafter.subject_module", "load_subject_module"),
              ("customcrafter.subject_module", "save_subject_module")]
    for module, attr in checks:
        try:
            if not hasattr(importlib.import_module(module), attr):
                return f"{module}.{attr} does not exist yet"
        except ImportError:
            return f"{module} does not exist yet"
    return None


@pytest.mark.integration
@pytest.mark.skipif(_real_model_code_missing() is not None, reason=str(_real_model_code_missing()))
def test_champion_generates_a_video_in_a_fresh_process(uri, tmp_path):
    """models:/customcrafter-dog@champion → a video, in a new interpreter, on the tiny base model."""
    from customcrafter.training.config import TrainConfig
    from customcrafter.training.trainer import train

    # A one-step subject module on the tiny base model: registry plumbing is under test, not training.
    subject = Path(__file__).resolve().parents[1] / "data" / "subjects" / "dog"
    config = TrainConfig(base_model="tiny", subject_dir=str(subject), class_word="dog",
                         output_dir=str(tmp_path / "run"), resolution=(64, 96), num_frames=2, steps=1,
                         prior_preservation=False, checkpoint_every=None)
    module = train(config).module_dir
    register_subject_model(uri, "dog", module, "tiny", GOOD, TAGS)

    script = textwrap.dedent("""
        import sys, numpy as np, pandas as pd, mlflow.pyfunc
        model = mlflow.pyfunc.load_model("models:/customcrafter-dog@champion")
        (video,) = model.predict(pd.DataFrame({"prompt": ["<new1> dog is running"], "seed": [0],
                                               "num_inference_steps": [2], "num_frames": [2],
                                               "height": [64], "width": [64]}))
        video = np.asarray(video)
        assert video.dtype == np.uint8 and video.shape[-1] == 3, (video.dtype, video.shape)
        print("VIDEO_SHAPE", video.shape)
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "VIDEO_SHAPE" in proc.stdout
