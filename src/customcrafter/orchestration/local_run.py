"""The pipeline's steps as plain functions, and the whole pipeline run on one machine.

- ``*_step`` functions: what the KFP components of ``components/`` call (one per component; the components only
  move artifact paths and metadata). Each returns a :class:`StepResult`.
- :func:`run_training`: in-process training, or ``accelerate launch`` over every visible GPU.
- :func:`compile_pipelines`, :func:`pipeline_arguments`: compile the pipelines; parse ``key=value`` parameters.
- :func:`run_local`: the pipeline of ``pipelines/customcrafter_pipeline.py`` on this machine with KFP's
  ``SubprocessRunner(use_venv=False)``, MLflow on a local sqlite store, the data of the DVC workspace and the tiny
  base model by default (``customcrafter pipeline run-local``).

MLflow layout, per pipeline run and subject: a parent run ``<subject>`` (tags: pipeline job, data version, GX
result) with one nested run ``<subject>/<method>`` per method (resolved config as params, the loss curve, the
subject module, the sample videos, the evaluation metrics). The registered model of the subject is logged from
the CustomCrafter run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from customcrafter.config import StrictModel
from customcrafter.data.subjects import check_subject_name
from customcrafter.orchestration.git_credentials import data_repo_git
from customcrafter.orchestration.settings import (
    COMPILED_DIR,
    PIPELINE_FILES,
    REGISTERED_METHOD,
    REPO_ROOT,
    CompileSettings,
)
from customcrafter.training.method_names import check_methods

logger = logging.getLogger(__name__)

__all__ = [
    "StepResult", "SECTIONS", "SECTION_MODELS", "RunOptions", "normalise_overrides", "split_overrides",
    "fetch_subject", "validate_step",
    "augment_step", "train_step", "run_training", "sample_step", "evaluate_step", "register_step", "plan_step",
    "compile_pipelines", "pipeline_arguments", "LocalRunResult", "run_local",
]

# Config sections a ``section.key=value`` override can address. "run" holds the local run's own knobs.
SECTIONS = ("train", "sample", "augment", "evaluate", "run")
# The pydantic config model each section's keys must name a field of (imported when a section is used).
SECTION_MODELS = {
    "train": "customcrafter.training.config:TrainConfig",
    "sample": "customcrafter.sampling:SampleConfig",
    "augment": "customcrafter.data.augment:AugmentConfig",
    "evaluate": "customcrafter.evaluation.config:EvalConfig",
    "run": "customcrafter.orchestration.local_run:RunOptions",
}
# Keys a step reads itself, beside its config model's fields.
SECTION_EXTRA_KEYS = {"augment": ("num_examples",)}


@dataclass
class StepResult:
    """What a step hands back to its component: the return value, artifact metadata and Metrics entries."""

    value: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ overrides
def normalise_overrides(overrides: str | dict | Iterable[str] | None) -> list[str]:
    """``section.key=value`` strings from a list of them, a dict or a JSON object string (values as YAML/JSON)."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        text = overrides.strip()
        if not text:
            return []
        overrides = json.loads(text) if text.startswith("{") else [text]
    if isinstance(overrides, dict):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    out: list[str] = []
    for item in overrides:
        item = str(item).strip()
        out.extend(normalise_overrides(item) if item.startswith("{") else [item] if item else [])
    return out


class RunOptions(StrictModel):
    """The ``run`` section: the local run's own knobs (pipeline parameters of the same names)."""

    seeds: list[int] = Field([0, 1, 2], min_length=1, description="sampling seeds per evaluation prompt")
    prompt_limit: int = Field(0, ge=0, description="first N evaluation prompts per subject (0 = all)")


def split_overrides(overrides: str | dict | Iterable[str] | None) -> dict[str, list[str]]:
    """Route ``section.key=value`` overrides to their section (prefix removed). Unknown sections, and keys that
    are no field of the section's config model (:data:`SECTION_MODELS`), are errors naming the valid ones."""
    routed: dict[str, list[str]] = {section: [] for section in SECTIONS}
    for item in normalise_overrides(overrides):
        key, sep, value = item.partition("=")
        section, dot, rest = key.strip().partition(".")
        if not sep or not dot or section not in routed or not rest:
            raise ValueError(f"config override {item!r}: expected SECTION.KEY=VALUE with SECTION one of "
                             f"{', '.join(SECTIONS)}")
        _check_override_key(item, section, rest)
        routed[section].append(f"{rest}={value}")
    return routed


def _section_model(section: str) -> type[BaseModel]:
    import importlib

    module, _, name = SECTION_MODELS[section].partition(":")
    return getattr(importlib.import_module(module), name)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds (``Model`` or ``Model | None``), else None."""
    import typing

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _check_override_key(item: str, section: str, key: str) -> None:
    """``key`` (dotted into nested configs) must name a field of the section's config model."""
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in SECTION_EXTRA_KEYS.get(section, ()):
        return
    model, path = _section_model(section), section
    for index, part in enumerate(parts):
        if model is None:
            raise ValueError(f"config override {item!r}: {path} is not a section (no field {part!r} below it)")
        fields = model.model_fields
        if part not in fields:
            valid = sorted([*fields, *(SECTION_EXTRA_KEYS.get(section, ()) if index == 0 else ())])
            raise ValueError(f"config override {item!r}: {path} ({model.__name__}) has no field {part!r}; "
                             f"valid fields: {', '.join(valid)}")
        model, path = _nested_model(fields[part].annotation), f"{path}.{part}"


# ---------------------------------------------------------------------------------------------- data
def _is_remote(source: str) -> bool:
    return "://" in source or source.startswith("git@")


def _local_data_root(source: str | Path) -> Path:
    """``source`` is a repository (holding ``data/subjects``) or a data root (holding ``subjects/``)."""
    path = Path(source).expanduser().resolve()
    for root in (path / "data", path):
        if (root / "subjects").is_dir():
            return root
    raise FileNotFoundError(f"{path}: no data/subjects or subjects folder (run `dvc pull` in the repository)")


def fetch_subject(data_source: str, data_revision: str, subject: str, out_dir: str | Path) -> Path:
    """Copy one subject (and its class-prior images, when present) into ``out_dir`` in the data-root layout
    (``subjects/<name>/``, ``class_images/<class>/``); return ``out_dir``.

    ``data_source`` is a local repository/data root (its working tree is used; ``data_revision`` is recorded
    only) or a git repository URL whose data come from its DVC remote at ``data_revision`` (S3 credentials from
    the environment: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``; a private repository's git token from
    ``GIT_TOKEN``, see :func:`~customcrafter.orchestration.git_credentials.data_repo_git`).
    """
    check_subject_name(subject)
    out = Path(out_dir)
    target = out / "subjects" / subject
    target.parent.mkdir(parents=True, exist_ok=True)
    if _is_remote(data_source):
        from dvc.repo import Repo

        with data_repo_git(data_source):
            Repo.get(data_source, f"data/subjects/{subject}", out=str(target), rev=data_revision or None)
        class_word = _class_word(target, f"subject {subject!r} of {data_source}@{data_revision or 'HEAD'}")
        if class_word is None:
            return out
        try:
            with data_repo_git(data_source):
                Repo.get(data_source, f"data/class_images/{class_word}",
                         out=str(out / "class_images" / class_word), rev=data_revision or None)
        except Exception as exc:  # noqa: BLE001 - class images are optional (the trainer can generate them)
            logger.info("no class images for %r in %s: %s", class_word, data_source, exc)
    else:
        root = _local_data_root(data_source)
        source = root / "subjects" / subject
        if not source.is_dir():
            raise FileNotFoundError(f"{source}: no such subject (known: "
                                    f"{', '.join(sorted(p.name for p in (root / 'subjects').iterdir()))})")
        shutil.copytree(source, target, dirs_exist_ok=True)
        class_word = _class_word(source, str(source))  # the source folder, so messages name it
        if class_word and (root / "class_images" / class_word).is_dir():
            shutil.copytree(root / "class_images" / class_word, out / "class_images" / class_word,
                            dirs_exist_ok=True)
    return out


def _class_word(subject_dir: Path, where: str) -> str | None:
    """The subject's class word (to fetch its class images), or None when the folder does not load: the data
    validation that follows reports the problem (the pipeline stops there), so fetching must not fail first."""
    from customcrafter.data.subjects import SubjectDataError, load_subject

    try:
        return load_subject(subject_dir).class_word
    except SubjectDataError as exc:
        logger.warning("%s: no class images fetched, the subject does not load (data validation reports it): %s",
                       where, exc)
        return None


def _data_version(data_source: str, data_revision: str) -> dict[str, str]:
    """The DVC md5 of ``data/`` and the git revision at the source (what the registry tags record); a local
    source whose data differ from its commit gets ``<revision>-dirty``."""
    from customcrafter.data.subjects import data_version

    if _is_remote(data_source):
        import dvc.api
        import yaml

        with data_repo_git(data_source):
            outs = (yaml.safe_load(dvc.api.read("data.dvc", repo=data_source, rev=data_revision or None)) or {})
        md5 = ((outs.get("outs") or [{}])[0]).get("md5")
        return {"dvc_md5": md5 or "unknown", "git_revision": data_revision or "HEAD"}
    repo = _local_data_root(data_source).parent
    version = data_version(repo)
    return {"dvc_md5": version.dvc_md5 or "untracked", "git_revision": version.label or "unknown"}


# ------------------------------------------------------------------------------------------- tracking
def _tracker(tracking_uri: str, experiment: str):
    from customcrafter.orchestration.tracking import Tracker

    return Tracker(tracking_uri=tracking_uri, experiment=experiment)


def _existing_run(tracker, run_id: str, name: str):
    """A handle on a run another step created (steps run in separate processes)."""
    from customcrafter.orchestration.tracking import RunHandle

    # TODO(ops): replace with a public Tracker.attach_run(run_id) when it exists.
    tracker._run_ids[run_id] = run_id
    return RunHandle(key=run_id, name=name, tracker=tracker)


def _child_tags(parent_metadata: dict[str, Any], method: str) -> dict[str, Any]:
    keys = ("subject", "data_revision", "data_dvc_md5", "data_git_revision", "subject_content_hash")
    tags = {k: parent_metadata[k] for k in keys if parent_metadata.get(k) is not None}
    tags["method"] = method
    if parent_metadata.get("mlflow_parent_run_id"):
        tags["mlflow.parentRunId"] = parent_metadata["mlflow_parent_run_id"]  # nested under the pipeline run
    return tags


# ---------------------------------------------------------------------------------------------- steps
def validate_step(*, data_source: str, data_revision: str, subject: str, out_dir: str, html_path: str,
                  tracking_uri: str, experiment: str, pipeline_job: str) -> StepResult:
    """Fetch and validate one subject; open its MLflow pipeline run (logs the GX report)."""
    from customcrafter.data.subjects import subject_content_hash
    from customcrafter.data.validate import validate_data

    root = fetch_subject(data_source, data_revision, subject, out_dir)
    version = _data_version(data_source, data_revision)
    reports = Path(tempfile.mkdtemp(prefix="gx-"))
    result = validate_data(root, subjects=[subject], out_dir=reports)
    shutil.copyfile(result.html_path, html_path)
    problems = _problems(result.problems, subject)
    content_hash = subject_content_hash(Path(root) / "subjects" / subject) if result.success else ""
    tags = {"subject": subject, "pipeline_job": pipeline_job, "data_revision": data_revision,
            "data_dvc_md5": version["dvc_md5"], "data_git_revision": version["git_revision"],
            "subject_content_hash": content_hash, "validation": "passed" if result.success else "failed"}
    with _tracker(tracking_uri, experiment) as tracker, tracker.start_run(subject, tags=tags) as run:
        tracker.log_artifact(html_path, "data_validation", run=run)
        tracker.log_artifact(result.json_path, "data_validation", run=run)
        tracker.log_metrics({"data_valid": float(result.success), "data_problems": float(len(problems))}, run=run)
    for problem in problems:
        logger.warning("%s: %s", subject, problem)
    metadata = {"subject": subject, "mlflow_parent_run_id": run.run_id or "", "data_source": data_source,
                "data_revision": data_revision, "data_dvc_md5": version["dvc_md5"],
                "data_git_revision": version["git_revision"], "subject_content_hash": content_hash,
                "problems": problems[:20]}
    return StepResult(value=bool(result.success), metadata=metadata,
                      metrics={"passed": float(result.success), "problems": float(len(problems))})


def _problems(problems: Any, subject: str) -> list[str]:
    if isinstance(problems, dict):
        return [str(p) for p in problems.get(subject, [])]
    return [str(p) for p in problems or []]


def augment_step(*, subject_data: str, subject: str, out_dir: str, config_overrides: list[str],
                 seed: int) -> StepResult:
    """Materialise the augmented examples (and ``preview.png``) of one subject."""
    from customcrafter.config import load_config
    from customcrafter.data.augment import AugmentConfig, materialise_examples

    routed = split_overrides(config_overrides)
    options = apply_overrides_dict(routed["augment"])
    num_examples = int(options.pop("num_examples", 16))
    config = load_config(AugmentConfig, overrides=[f"{k}={json.dumps(v)}" for k, v in options.items()])
    materialise_examples(Path(subject_data) / "subjects" / subject, out_dir, num_examples=num_examples, seed=seed,
                         config=config)
    return StepResult(metadata={"subject": subject, "num_examples": num_examples, "seed": seed,
                                "preview": "preview.png", "resolution": list(config.resolution)})


def apply_overrides_dict(overrides: list[str]) -> dict[str, Any]:
    from customcrafter.config import apply_overrides

    return apply_overrides({}, overrides)


def train_step(*, subject_data: str, subject_metadata: dict[str, Any], augmented: str, subject: str, method: str,
               base_model: str, config_overrides: list[str], module_dir: str, tracking_uri: str,
               experiment: str, pipeline_job: str = "") -> StepResult:
    """Train one subject module with one method; log config, loss curve and module to the subject×method run.

    With ``pipeline_job`` (a cluster run's id), checkpoints go to the model cache (``CUSTOMCRAFTER_CACHE``, a volume
    shared by the pods) under ``checkpoints/<job>/<subject>/<method>``, so a retried pod resumes there instead of
    starting again in its own empty folder; a finished run removes them (``customcrafter pipeline prune-checkpoints``
    those of runs that failed for good)."""
    from customcrafter.config import load_config
    from customcrafter.data.subjects import load_subject
    from customcrafter.training.config import TrainConfig

    check_methods([method], argument="method")  # the pipeline's methods parameter reaches the cluster unchecked
    subject_dir = Path(subject_data) / "subjects" / subject
    overrides = split_overrides(config_overrides)["train"]
    provided = Path(subject_data) / "class_images" / load_subject(subject_dir).class_word
    if provided.is_dir():  # the data's own class images (fetched with the subject); an override still wins
        overrides = [f"class_images_dir={json.dumps(str(provided))}", *overrides]
    if pipeline_job:
        from customcrafter.orchestration.checkpoints import job_checkpoints_dir

        checkpoints = job_checkpoints_dir(pipeline_job, subject, method)
        overrides = [f"checkpoints_dir={json.dumps(str(checkpoints))}", *overrides]
    config = load_config(TrainConfig, overrides=overrides, subject_dir=str(subject_dir), method=method,
                         base_model=base_model, output_dir=module_dir, examples_dir=augmented)
    with _tracker(tracking_uri, experiment) as tracker, \
            tracker.start_run(f"{subject}/{method}", tags=_child_tags(subject_metadata, method)) as run:
        tracker.log_params(config, run=run)
        result = run_training(config)
        tracker.log_params({"resolved": result.schedule}, run=run)  # e.g. a learning rate set by the global batch
        for step, loss in enumerate(result.losses):
            tracker.log_metric("train_loss", float(loss), step=step, run=run)
        metrics = {"train_steps": float(result.steps), "train_seconds": float(result.seconds),
                   "final_loss": float(result.losses[-1]) if result.losses else float("nan")}
        if result.step_seconds:  # the first log interval holds the warm-up (and CUDA-graph capture)
            metrics["train_seconds_per_step"] = float(statistics.median(result.step_seconds[1:] or
                                                                        result.step_seconds))
        tracker.log_metrics(metrics, run=run)
        tracker.log_artifacts(result.module_dir, "subject_module", run=run)
    metadata = {"subject": subject, "method": method, "base_model": base_model, "mlflow_run_id": run.run_id or "",
                "mlflow_parent_run_id": subject_metadata.get("mlflow_parent_run_id", ""),
                "subject_content_hash": subject_metadata.get("subject_content_hash", ""),
                "steps": int(result.steps)}
    return StepResult(metadata=metadata, metrics=metrics)


def run_training(config):
    """Train in this process, or with ``accelerate launch --num_processes <GPUs>`` when more than one GPU is
    visible. Returns the :class:`~customcrafter.training.trainer.TrainResult` of the main process."""
    import torch

    from customcrafter.training.trainer import TrainResult, check_token_before_loading, train

    gpus = torch.cuda.device_count()
    if gpus <= 1:
        return train(config)
    from customcrafter.loading import resolve_base_model

    check_token_before_loading(config)  # before the download and conversion below, and the processes' loading
    resolve_base_model(config.base_model)  # download and convert here, once: each process then finds it cached
    with tempfile.TemporaryDirectory(prefix="cc-train-") as tmp:
        config_path, result_path = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config_path.write_text(config.model_dump_json())
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
               "-m", "customcrafter.orchestration.local_run", "train-worker", str(config_path), str(result_path)]
        logger.info("training on %d GPUs: %s", gpus, " ".join(cmd))
        subprocess.run(cmd, check=True)
        data = json.loads(result_path.read_text())
    data["module_dir"] = Path(data["module_dir"])
    return TrainResult(**data)


def _train_worker(config_path: str, result_path: str) -> None:
    """One process of ``accelerate launch``; rank 0 writes the result."""
    from customcrafter.training.config import TrainConfig
    from customcrafter.training.trainer import train
    from customcrafter.utils import setup_logging

    rank = int(os.environ.get("RANK", "0"))
    setup_logging(logging.INFO if rank == 0 else logging.WARNING)  # the run's INFO lines reach the pod log once
    result = train(TrainConfig.model_validate_json(Path(config_path).read_text()))
    if rank == 0:
        Path(result_path).write_text(json.dumps({"module_dir": str(result.module_dir), "losses": list(result.losses),
                                                 "steps": result.steps, "seconds": result.seconds,
                                                 "step_seconds": list(result.step_seconds),
                                                 "schedule": result.schedule}))


def sample_step(*, subject_data: str, module_dir: str, module_metadata: dict[str, Any], subject: str,
                base_model: str, config_overrides: list[str], seeds: list[int], prompt_limit: int,
                out_dir: str) -> StepResult:
    """Sample the evaluation prompts with one subject module (DWVSS for CustomCrafter, plain for baselines)."""
    from customcrafter.config import load_config
    from customcrafter.loading import load_base_pipeline
    from customcrafter.performance import SpeedConfig, optimize_pipeline
    from customcrafter.sampling import SampleConfig, sample_evaluation_set
    from customcrafter.subject_module import load_subject_module
    from customcrafter.utils import pick_device

    method = module_metadata["method"]
    config = load_config(SampleConfig, overrides=split_overrides(config_overrides)["sample"])
    pipe = load_base_pipeline(base_model, device=pick_device(None))
    load_subject_module(pipe, module_dir)
    # Many videos per step: on a GPU the whole-UNet compile pays for its minutes (benchmarks/RESULTS.md).
    optimize_pipeline(pipe, SpeedConfig(compile="full"))
    manifest = sample_evaluation_set(pipe, method=method, subject=subject,
                                     subject_dir=Path(subject_data) / "subjects" / subject, out_dir=Path(out_dir),
                                     seeds=[int(s) for s in seeds], prompt_limit=prompt_limit or None, config=config)
    num_videos = sum(1 for line in Path(manifest).read_text().splitlines() if line.strip())
    metadata = {k: module_metadata.get(k, "") for k in ("subject", "method", "mlflow_run_id",
                                                          "mlflow_parent_run_id")}
    metadata["num_videos"] = num_videos
    return StepResult(metadata=metadata)


def evaluate_step(*, samples: list[tuple[str, dict[str, Any]]], out_dir: str, report_html: str, summary_md: str,
                  config_overrides: list[str], tracking_uri: str, experiment: str) -> StepResult:
    """Score every method's videos; write the report; log metrics and videos to each method's run."""
    from customcrafter.config import load_config
    from customcrafter.evaluation.config import EvalConfig
    from customcrafter.evaluation.protocol import evaluate

    config = load_config(EvalConfig, overrides=split_overrides(config_overrides)["evaluate"])
    result = evaluate([Path(path) for path, _ in samples], Path(out_dir), config)
    shutil.copyfile(result.report_html, report_html)
    shutil.copyfile(result.summary_md, summary_md)
    flat = {f"{method}.{name}": float(value) for method, values in result.metrics.items()
            for name, value in values.items()}
    with _tracker(tracking_uri, experiment) as tracker:
        parents = set()
        for path, meta in samples:
            name = f"{meta.get('subject')}/{meta.get('method')}"

            def log(run, path=path, meta=meta):
                tracker.log_metrics(result.metrics.get(meta["method"], {}), run=run)
                tracker.log_artifacts(path, "samples", run=run)
                tracker.log_artifact(result.report_html, "evaluation", run=run)

            if meta.get("mlflow_run_id"):
                log(_existing_run(tracker, meta["mlflow_run_id"], name))
            else:  # its training run never reached MLflow (server away then): the results get a run of their own
                logger.warning("%s: no MLflow run from training; logging the evaluation to a new run", name)
                tags = {"subject": meta.get("subject"), "method": meta.get("method"), "created_by": "evaluate"}
                if meta.get("mlflow_parent_run_id"):
                    tags["mlflow.parentRunId"] = meta["mlflow_parent_run_id"]
                with tracker.start_run(name, tags=tags) as run:
                    log(run)
            parents.add(meta.get("mlflow_parent_run_id"))
        for parent_id in filter(None, parents):
            parent = _existing_run(tracker, parent_id, "pipeline")
            tracker.log_metrics(flat, run=parent)
            for file in (result.report_html, result.summary_md, result.summary_csv, result.per_video_csv):
                tracker.log_artifact(file, "evaluation", run=parent)
    methods = sorted(result.metrics)
    return StepResult(metadata={"methods": methods, "num_videos": result.num_videos}, metrics=flat)


def _code_commit() -> str:
    """The code's git commit: ``$CUSTOMCRAFTER_GIT_COMMIT`` (set when the image is built), else the checkout's."""
    if os.environ.get("CUSTOMCRAFTER_GIT_COMMIT"):
        return os.environ["CUSTOMCRAFTER_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def register_step(*, subject_data: str, subject_metadata: dict[str, Any], modules: list[tuple[str, dict[str, Any]]],
                  metrics: dict[str, Any], subject: str, base_model: str, data_revision: str, tracking_uri: str,
                  experiment: str) -> StepResult:
    """Register the CustomCrafter module of ``subject`` (alias challenger; champion if the gate passes)."""
    from customcrafter.orchestration.registry import PromotionGate, register_subject_model

    del subject_data  # the module records everything it needs; the data's identity comes from the metadata
    chosen = [(path, meta) for path, meta in modules if meta.get("method") == REGISTERED_METHOD]
    if not chosen:
        message = f"{subject}: no {REGISTERED_METHOD} module was trained (methods: " \
                  f"{', '.join(sorted(m.get('method', '?') for _, m in modules))}); nothing registered"
        logger.warning(message)
        return StepResult(value=message)
    module_dir, meta = chosen[0]
    prefix = f"{REGISTERED_METHOD}."
    candidate = {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}
    tags = {"data_revision": data_revision, "git_commit": _code_commit(), "method": REGISTERED_METHOD,
            "subject_hash": subject_metadata.get("subject_content_hash", ""),
            "data_dvc_md5": subject_metadata.get("data_dvc_md5", ""),
            "data_git_revision": subject_metadata.get("data_git_revision", "")}
    result = register_subject_model(tracking_uri, subject, module_dir, base_model_id=base_model, metrics=candidate,
                                    tags=tags, gate=PromotionGate(), experiment=experiment,
                                    run_id=meta.get("mlflow_run_id") or None)
    alias = "champion + challenger" if result.promoted else "challenger"
    return StepResult(value=f"{result.name} v{result.version} ({alias}): {result.reason}")


def _subjects_root(data_source: str, data_revision: str) -> Path:
    """A data root holding ``subjects/`` at the source (a temporary copy for a remote repository)."""
    if not _is_remote(data_source):
        return _local_data_root(data_source)
    from dvc.repo import Repo

    root = Path(tempfile.mkdtemp(prefix="cc-plan-"))
    with data_repo_git(data_source):
        Repo.get(data_source, "data/subjects", out=str(root / "subjects"), rev=data_revision or None)
    return root


def plan_step(*, data_source: str, data_revision: str, subjects: list[str], tracking_uri: str) -> list[str]:
    """Subjects at ``data_revision`` (those in ``subjects`` if given) that are new or changed vs the registry."""
    from customcrafter.data.subjects import subject_content_hash
    from customcrafter.orchestration.registry import registered_subject_versions, subjects_to_retrain

    wanted = set(subjects or [])
    found = _plannable_subjects(_subjects_root(data_source, data_revision), wanted)
    unknown = wanted - {s.name for s in found}
    if unknown:
        raise ValueError(f"subjects not in the data: {', '.join(sorted(unknown))}")
    current = {s.name: subject_content_hash(s.dir) for s in found if not wanted or s.name in wanted}
    todo = subjects_to_retrain(current, registered_subject_versions(tracking_uri))
    logger.info("retraining plan: %d of %d subjects new or changed: %s", len(todo), len(current),
                ", ".join(todo) or "none")
    return todo


def _plannable_subjects(data_root: Path, wanted: set[str]):
    """The subjects under ``data_root/subjects`` that load. A folder that does not is skipped with a warning (one
    broken subject must not block the others' retraining), unless it is one of ``wanted``: then it is an error."""
    from customcrafter.data.subjects import SubjectDataError, load_subject, subject_dirs

    found = []
    for folder in subject_dirs(data_root):
        try:
            found.append(load_subject(folder))
        except SubjectDataError as exc:
            if folder.name in wanted:
                raise SubjectDataError(f"subject {folder.name!r} was asked for but cannot be loaded: {exc}") \
                    from None
            logger.warning("retraining plan: skipping subject folder %s: cannot be loaded: %s", folder, exc)
    return found


# ------------------------------------------------------------------------------------------- compile
def _import_pipeline_module(module: str):
    import importlib

    if str(REPO_ROOT) not in sys.path and (REPO_ROOT / "pipelines").is_dir():
        sys.path.insert(0, str(REPO_ROOT))
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(f"cannot import {module} ({exc}): run from a checkout of the repository") from exc


def compile_pipelines(output_dir: str | Path = COMPILED_DIR, settings: CompileSettings | None = None) -> list[Path]:
    """Compile every pipeline of ``pipelines/`` into ``output_dir``; return the YAML paths."""
    return [_import_pipeline_module(module).compile_pipeline(output_dir, settings) for module in PIPELINE_FILES]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def pipeline_arguments(params: Iterable[str] | None) -> dict[str, Any]:
    """``key=value`` strings → pipeline arguments. Values are JSON when they parse (``seeds=[0,1]``,
    ``prompt_limit=2``), else strings. ``subject=dog`` and ``subjects=dog,cat`` become ``subjects=[...]``;
    ``methods=a,b`` a list; ``config_overrides`` takes a JSON list, a JSON object or one ``k=v`` string."""
    args: dict[str, Any] = {}
    for item in params or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--param {item!r}: expected KEY=VALUE")
        if key == "subject":
            key, value = "subjects", json.dumps([value])
        if key in ("subjects", "methods") and not value.lstrip().startswith("["):
            value = json.dumps([v.strip() for v in value.split(",") if v.strip()])
        if key == "config_overrides":
            args[key] = normalise_overrides(value if value.lstrip()[:1] in "{" else
                                            _parse_value(value) if value.lstrip().startswith("[") else [value])
            routed = split_overrides(args[key])  # every SECTION.KEY must exist before anything is submitted
            if routed["run"]:
                raise ValueError(f"config_overrides: {', '.join('run.' + o for o in routed['run'])}: the run section "
                                 "is the local run's; on a cluster pass the pipeline parameters of the same names "
                                 "(e.g. --param seeds=[0,1] --param prompt_limit=2)")
            continue
        parsed = _parse_value(value)
        if key == "methods":
            check_methods(parsed, argument=f"--param {item!r}")
        if key == "subjects" and isinstance(parsed, list):  # not a list: the KFP client says so
            for name in parsed:
                check_subject_name(name, argument=f"--param {item!r}")
        args[key] = _refuse_credentials(key, parsed)
    return args


def _refuse_credentials(key: str, value: Any) -> Any:
    """``value``, unless it is a URL carrying credentials (``https://user:secret@host``, or a token as the user
    of an http(s) URL, :func:`_looks_like_token`): KFP stores run parameters and shows them to every user of its
    namespace, and the steps log them. The message does not repeat the value."""
    import urllib.parse

    if not isinstance(value, str) or "://" not in value:
        return value
    try:
        parts = urllib.parse.urlsplit(value.strip())
        secret = parts.password or (parts.scheme in ("http", "https") and _looks_like_token(parts.username))
    except ValueError:  # not a URL
        return value
    if secret:
        raise ValueError(f"--param {key}: the URL carries credentials; a run parameter is stored by KFP and shown "
                         "to every user of its namespace. Give the URL without them: the pods get credentials from "
                         "Kubernetes Secrets (k8s/secrets, docs/OPERATIONS.md): "
                         f"{_CREDENTIAL_SECRETS.get(key, _ANY_SECRET)}")
    return value


#: prefixes of the access tokens that git hosts issue (GitHub, GitLab), as given in place of a user name
TOKEN_PREFIXES = ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-", "gldt-")


def _looks_like_token(user: str | None) -> bool:
    """The user part of an http(s) URL is a token (``https://ghp_…@github.com``), not a name: a known token prefix,
    or 20 characters or more (tokens are 20-90; the copy-paste clone URLs of Bitbucket and Azure DevOps carry the
    account name, ``https://alice@bitbucket.org/…``, which is no secret and stays allowed)."""
    return bool(user) and (user.startswith(TOKEN_PREFIXES) or len(user) >= 20)


# Where each URL parameter's credentials go instead (docs/OPERATIONS.md, "Secrets").
_CREDENTIAL_SECRETS = {
    "data_source": "a private data repository's token goes in the optional Secret git-credentials (key GIT_TOKEN, "
                   "optionally GIT_USERNAME), which the pods cloning it get as env",
    "mlflow_tracking_uri": "MLflow's user and password go in the Secret mlflow-client",
}
_ANY_SECRET = "git-credentials for the data repository, mlflow-client for MLflow"


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "train-worker":
    _train_worker(sys.argv[2], sys.argv[3])


# ------------------------------------------------------------------------------------------ local run
@dataclass
class LocalRunResult:
    """Where a local run left its outputs."""

    out_dir: Path
    run_dir: Path  # the KFP local run's folder under <out>/kfp_root
    tracking_uri: str
    experiment: str
    videos: list[Path]
    reports: list[Path]
    trained: list[str]  # "<subject>/<method>" trained in this run
    registered: dict[str, str]  # subject -> "customcrafter-<subject> vN (aliases)"


def _run_subjects(subjects: Iterable[str] | None, retrain: bool) -> list[str]:
    """The ``subjects`` parameter: the given ones; if none, ``dog`` for a run, every subject ([]) to retrain
    (where the list is a filter of the planner)."""
    return list(subjects or ([] if retrain else ["dog"]))


def _ensure_data(repo: Path, echo) -> Path:
    try:
        return _local_data_root(repo)
    except FileNotFoundError:
        if not (repo / "data.dvc").is_file():
            raise
    echo(f"{repo / 'data'} is missing: fetching it with `dvc pull` from the repository's DVC remote ...")
    subprocess.run(["dvc", "pull"], cwd=repo, check=True)
    return _local_data_root(repo)


def _ensure_experiment(tracking_uri: str, experiment: str, artifact_root: Path) -> None:
    """Create the experiment with its artifacts under ``artifact_root`` (not ./mlruns of the working dir)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if client.get_experiment_by_name(experiment) is None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        client.create_experiment(experiment, artifact_location=artifact_root.resolve().as_uri())


def _registered(tracking_uri: str, subjects: Iterable[str]) -> dict[str, str]:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from customcrafter.orchestration.registry import model_name

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = {}
    for subject in subjects:
        name = model_name(subject)
        try:
            versions = client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            continue
        if versions:
            newest = max(versions, key=lambda v: int(v.version))
            aliases = client.get_registered_model(name).aliases
            names = sorted(a for a, v in aliases.items() if str(v) == str(newest.version))
            found[subject] = f"{name} v{newest.version} ({', '.join(names) or 'no alias'})"
    return found


def tiny_evaluation_models(out_dir: Path) -> tuple[Path, Path]:
    """Tiny random CLIP (with the packaged CLIP tokenizer) and DINO ViT folders for offline runs of the tiny
    model: the evaluation runs for real, its numbers mean nothing. Built once per ``out_dir`` (seconds)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    import customcrafter

    clip_dir, dino_dir = out_dir / "clip", out_dir / "dino"
    if (clip_dir / "config.json").is_file() and (dino_dir / "config.json").is_file():
        return clip_dir, dino_dir
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(Path(customcrafter.__file__).parent / "models" / "tokenizer")
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **size)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(image_size=32, patch_size=8, **size),
                                projection_dim=16))
    clip.save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    ViTModel(ViTConfig(image_size=32, patch_size=8, **size), add_pooling_layer=False).save_pretrained(dino_dir)
    return clip_dir, dino_dir


def run_local(*, subjects: list[str] | None = None, methods: list[str] | None = None, base_model: str = "tiny",
              out: str | Path = "outputs/local", preset: str = "tiny", overrides: Iterable[str] = (),
              data_source: str | Path = ".", experiment: str = "customcrafter", retrain: bool = False,
              echo=print) -> LocalRunResult:
    """Run the pipeline (or ``retrain_new_subjects`` with ``retrain``) on this machine; see the module docstring.

    ``preset`` ('tiny'/'ci' or 'full') gives config overrides that ``overrides`` extend; the ``run`` section of
    them sets the pipeline's ``seeds`` and ``prompt_limit``. Prints the preset, then where everything is.
    """
    import kfp.local

    from customcrafter.config import load_config
    from customcrafter.data.subjects import subject_dirs
    from customcrafter.orchestration.settings import DEFAULT_METHODS, preset_overrides

    methods = check_methods(list(methods or DEFAULT_METHODS), argument="--methods")  # before `dvc pull`, too
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    repo = Path(data_source).resolve()
    data_root = _ensure_data(repo, echo)
    subjects = _run_subjects(subjects, retrain)
    _check_subjects(subjects, data_root)  # a typo fails here, not minutes later inside a task
    all_overrides = preset_overrides(preset) + normalise_overrides(list(overrides))
    routed = split_overrides(all_overrides)  # validates every override before anything runs
    run_options = load_config(RunOptions, overrides=routed["run"])
    config_overrides = [o for o in all_overrides if not o.startswith("run.")]
    seeds, prompt_limit = list(run_options.seeds), run_options.prompt_limit

    echo(f"preset {preset!r}" + (":" if all_overrides else ": paper settings, no reductions"))
    for item in all_overrides:
        echo(f"  {item}")
    if base_model == "tiny":
        echo("base model: 'tiny' (a small randomly initialised VideoCrafter2-shaped model): every stage runs for "
             "real, but its videos are noise")
        if not any(o.startswith(("evaluate.clip_model=", "evaluate.dino_model=")) for o in config_overrides):
            clip_dir, dino_dir = tiny_evaluation_models(out_dir / "eval_models")
            config_overrides += [f"evaluate.clip_model={clip_dir}", f"evaluate.dino_model={dino_dir}"]
            echo(f"evaluation: tiny random CLIP/DINO in {clip_dir.parent} (no weights offline): the metrics are "
                 "computed for real but mean nothing")

    tracking_uri = f"sqlite:///{out_dir / 'mlflow.db'}"
    _ensure_experiment(tracking_uri, experiment, out_dir / "mlartifacts")
    for key, value in {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                       "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
                       "CUSTOMCRAFTER_SPOOL_DIR": str(out_dir / "mlflow-spool")}.items():
        os.environ.setdefault(key, value)
    data_revision = _data_version(str(repo), "")["git_revision"]
    if data_revision == "unknown":
        data_revision = "workspace"

    pipeline_root = out_dir / "kfp_root"
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.iterdir())
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    # Expected locally: the tasks run in this Python environment, not in the project image, and the
    # Kubernetes settings (GPUs, PVC, secrets, node placement) do not apply.
    warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
    echo("KFP local runner: tasks run as subprocesses of this Python; GPU/PVC/secret settings apply on a "
         "cluster only")
    arguments = dict(data_source=str(data_root), data_revision=data_revision, base_model=base_model,
                     config_overrides=config_overrides, methods=methods, seeds=seeds, prompt_limit=prompt_limit,
                     mlflow_tracking_uri=tracking_uri, experiment_name=experiment)
    if retrain:
        pipeline = _import_pipeline_module("pipelines.retrain_new_subjects").retrain_new_subjects
        echo(f"running retrain_new_subjects over {', '.join(subjects) or 'all subjects'} (trains only new or "
             "changed subjects)")
        pipeline(subjects=subjects, **arguments)
    else:
        pipeline = _import_pipeline_module("pipelines.customcrafter_pipeline").customcrafter_pipeline
        echo(f"running the pipeline: subjects {', '.join(subjects)}; methods {', '.join(methods)}")
        pipeline(subjects=subjects, **arguments)

    (run_dir,) = [p for p in pipeline_root.iterdir() if p not in before] or [pipeline_root]
    videos = sorted(run_dir.glob("**/sample-videos/samples/**/*.mp4"))
    # the report artifact's copy named .html (the artifact file itself has no extension for a browser to go by)
    reports = sorted(run_dir.glob("**/evaluate-methods/results/report.html"))
    trained = sorted(f"{m.get('subject')}/{m.get('method')}" for m in _artifact_metadata(run_dir, "train-subject"))
    result = LocalRunResult(out_dir=out_dir, run_dir=run_dir, tracking_uri=tracking_uri, experiment=experiment,
                            videos=videos, reports=reports, trained=trained,
                            registered=_registered(tracking_uri, subjects or [p.name for p in subject_dirs(data_root)]))
    _print_summary(result, base_model, echo)
    return result


def _check_subjects(subjects: list[str], data_root: Path) -> None:
    from customcrafter.data.subjects import subject_dirs

    known = {p.name for p in subject_dirs(data_root)}
    if missing := [s for s in subjects if s not in known]:
        raise FileNotFoundError(f"--subjects: no {', '.join(missing)} under {data_root / 'subjects'} (there: "
                                f"{', '.join(sorted(known)) or 'none'}; add one with `customcrafter data add`)")


def _artifact_metadata(run_dir: Path, task: str) -> list[dict[str, Any]]:
    """Metadata of the first output artifact of every ``task`` execution (from its executor_output.json)."""
    found = []
    for path in run_dir.glob(f"**/{task}/executor_output.json"):
        artifacts = json.loads(path.read_text()).get("artifacts", {})
        for item in artifacts.values():
            for artifact in item.get("artifacts", [])[:1]:
                if artifact.get("metadata", {}).get("method"):
                    found.append(artifact["metadata"])
    return found


def _print_summary(result: LocalRunResult, base_model: str, echo) -> None:
    echo("")
    echo(f"trained: {', '.join(result.trained) or 'nothing (no new or changed subjects)'}")
    if result.videos:
        folders = sorted({str(v.parent) for v in result.videos})
        echo(f"videos ({len(result.videos)}): {folders[0]}" + (f" (+{len(folders) - 1} more folders)"
                                                              if len(folders) > 1 else ""))
    for report in result.reports:
        echo(f"evaluation report: {report}  (open in a browser)")
    for subject, text in sorted(result.registered.items()):
        echo(f"registered: {text}  (list: customcrafter models list --tracking-uri {result.tracking_uri}; "
             f"sample: customcrafter sample --tracking-uri {result.tracking_uri} --subject-module "
             f"models:/customcrafter-{subject}@champion --base-model {base_model} --prompt '...' --out video.mp4)")
    echo(f"MLflow: experiment {result.experiment!r} in {result.tracking_uri} -> "
         f"mlflow ui --backend-store-uri {result.tracking_uri}")
    echo(f"KFP local run folder: {result.run_dir}")
    if base_model == "tiny":
        echo("note: these videos come from the tiny random model and are noise; run with the real VideoCrafter2 "
             "weights on a GPU for real videos (docs/PIPELINE.md)")
