"""Names and defaults shared by the Kubeflow components, the pipelines, the CLI and the local run.

One place for the project image, the Kubernetes objects the pipeline refers to (they match ``k8s/``), the
pipeline defaults and the local-run presets. Nothing here reads the environment at import time except the
compile-time knobs of :func:`compile_settings`, which are read when a pipeline module is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from customcrafter import __version__ as _version

if TYPE_CHECKING:
    from customcrafter.orchestration.kfp_client import GpuScheduling

__all__ = [
    "PROJECT_IMAGE", "DEFAULT_METHODS", "DEFAULT_SUBJECTS", "REGISTERED_METHOD", "DEFAULT_EXPERIMENT",
    "CLUSTER_TRACKING_URI", "PIPELINE_SERVICE_ACCOUNT", "PIPELINE_POD_LABELS", "SHM_SIZE", "SECRETS",
    "OPTIONAL_SECRETS", "DATA_REPO_SECRETS", "PRESETS",
    "COMPILED_DIR", "PIPELINE_FILES", "CompileSettings",
    "compile_settings", "preset_overrides",
]

# The one image every component runs in (built from the repository's Dockerfile; the tag follows the package).
PROJECT_IMAGE = f"ghcr.io/customcrafter/customcrafter:{_version}"

# Training methods: CustomCrafter and the baselines run on the same base model (see docs/METHOD.md).
DEFAULT_METHODS = ["customcrafter", "custom_diffusion", "dreamvideo"]
# The method whose subject modules go to the registry; the others are trained for comparison only.
REGISTERED_METHOD = "customcrafter"
# The sample subjects tracked in data/subjects (DVC).
DEFAULT_SUBJECTS = ["dog", "robot_toy", "cat", "backpack"]
DEFAULT_EXPERIMENT = "customcrafter"

# Kubernetes objects of k8s/. GPU node placement and the model-cache PVC come from
# customcrafter.orchestration.kfp_client.GpuScheduling (mirror of k8s/base/gpu-scheduling-configmap.yaml).
CLUSTER_TRACKING_URI = "http://mlflow.customcrafter.svc.cluster.local:5000"
# The identity pipeline pods run as (k8s/base/pipeline-runner-rbac.yaml); KFP sets it per run, not in the YAML.
PIPELINE_SERVICE_ACCOUNT = "customcrafter-pipeline-runner"
# The labels every pod of a pipeline run carries: the KFP v2 backend sets them on the Workflow's podMetadata. The
# NetworkPolicy in front of MLflow (k8s/base/mlflow-networkpolicy.yaml) lets pods with these labels in, no others.
PIPELINE_POD_LABELS = {"pipelines.kubeflow.org/v2_component": "true"}
SHM_SIZE = "16Gi"  # /dev/shm (an in-memory emptyDir) for data-loader workers and NCCL
# secret name -> {key in the secret: environment variable}. Templates without values: k8s/secrets/templates.yaml.
SECRETS: dict[str, dict[str, str]] = {
    "mlflow-client": {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                      "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"},
}
# Optional (a pod starts without them): the S3 credentials only matter where the DVC remote is in S3 (the MLflow
# server proxies artifacts, --serve-artifacts, and the base/local deployment has no S3 at all); the HF token only
# for gated hub models.
OPTIONAL_SECRETS: dict[str, dict[str, str]] = {
    "mlflow-s3": {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
                  "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL"},
    "customcrafter-hf": {"HF_TOKEN": "HF_TOKEN"},
}
# Optional too, and only in the pods that clone the data repository (validate, plan): the git credentials of a
# private data repository (``data_source``). A token in the URL is refused (KFP shows run parameters to everyone in
# the namespace); git_credentials.data_repo_git hands these to git from the environment. GIT_USERNAME may be left out.
DATA_REPO_SECRETS: dict[str, dict[str, str]] = {
    "git-credentials": {"GIT_TOKEN": "GIT_TOKEN", "GIT_USERNAME": "GIT_USERNAME"},
}

REPO_ROOT = Path(__file__).resolve().parents[3]
COMPILED_DIR = REPO_ROOT / "pipelines" / "compiled"
# pipeline module -> compiled file name
PIPELINE_FILES = {
    "pipelines.customcrafter_pipeline": "customcrafter_pipeline.yaml",
    "pipelines.retrain_new_subjects": "retrain_new_subjects.yaml",
}

# Config overrides of the local-run presets, as ``section.key=value`` strings applied to every stage's config
# (train / sample / evaluate / augment); see local_run.split_overrides for the routing.
# "tiny"/"ci": the whole pipeline on a 2-core CPU machine in a few minutes with the tiny base model. The
# reductions are printed by `customcrafter pipeline run-local`.
PRESETS: dict[str, list[str]] = {
    "tiny": [
        "train.steps=4",
        "train.num_class_images=2",
        "train.class_image_steps=2",
        "train.resolution=[64, 96]",
        "train.num_frames=2",
        "train.dreamvideo.inversion_steps=2",
        "augment.num_examples=2",
        "augment.resolution=[64, 96]",
        "sample.num_inference_steps=4",
        "sample.num_frames=4",
        "sample.height=64",
        "sample.width=96",
        "run.prompt_limit=1",
        "run.seeds=[0]",
    ],
    "full": [],
}
PRESETS["ci"] = list(PRESETS["tiny"])


def preset_overrides(name: str) -> list[str]:
    """The ``key=value`` overrides of a preset ('tiny', 'ci' or 'full')."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return list(PRESETS[name])


@dataclass(frozen=True)
class CompileSettings:
    """Compile-time knobs of the pipelines (a compiled YAML fixes them; recompile to change)."""

    image: str = PROJECT_IMAGE  # every task's container image
    train_gpus: int = 4  # the paper trained on 4 GPUs
    sample_gpus: int = 1
    evaluate_gpus: int = 1
    secrets: dict[str, dict[str, str]] = field(default_factory=lambda: dict(SECRETS))  # required; + OPTIONAL_SECRETS
    # GPU node placement and model cache (the customcrafter-gpu-scheduling ConfigMap, read with
    # kfp_client.gpu_scheduling_from_configmap); None: kfp_client.DEFAULT_GPU_SCHEDULING, the k8s/base one
    gpu_scheduling: GpuScheduling | None = None


def compile_settings() -> CompileSettings:
    """Settings for compiling; ``CUSTOMCRAFTER_TRAIN_GPUS`` changes the GPUs of the train task."""
    gpus = os.environ.get("CUSTOMCRAFTER_TRAIN_GPUS")
    if not gpus:
        return CompileSettings()
    if not gpus.strip().isdigit():
        raise ValueError(f"CUSTOMCRAFTER_TRAIN_GPUS: {gpus!r} is not a GPU count (a whole number >= 0)")
    return CompileSettings(train_gpus=int(gpus))
