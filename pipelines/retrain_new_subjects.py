"""Scheduled retraining: train only the subjects that are new or changed at the current DVC data revision.

``plan`` lists the subjects at ``data_revision`` and drops those whose content hash already has a registered
model version (MLflow registry tags); a ``dsl.ParallelFor`` runs the per-subject pipeline of
``pipelines.customcrafter_pipeline`` for each of the rest. Scheduled with ``customcrafter pipeline schedule``.

Compile (writes pipelines/compiled/retrain_new_subjects.yaml)::

    python -m pipelines.retrain_new_subjects            # or: customcrafter pipeline compile
"""

from pathlib import Path

from kfp import compiler, dsl

from components import plan_retraining
from customcrafter.orchestration.settings import (
    CLUSTER_TRACKING_URI,
    COMPILED_DIR,
    DEFAULT_EXPERIMENT,
    DEFAULT_METHODS,
    CompileSettings,
    compile_settings,
)
from pipelines.customcrafter_pipeline import (
    BASE_MODEL,
    DATA_REVISION,
    DATA_SOURCE,
    SEEDS,
    build_subject_pipeline,
    with_credentials,
)


def build_pipeline(settings: CompileSettings | None = None):
    """The retraining pipeline (``settings``: compile-time knobs, default from the environment)."""
    settings = settings or compile_settings()
    subject_pipeline = build_subject_pipeline(settings)

    @dsl.pipeline(name="retrain-new-subjects",
                  description="Train, evaluate and register the subjects that are new or changed at a DVC "
                              "data revision.")
    def retrain_new_subjects(
        data_source: str = DATA_SOURCE,
        data_revision: str = DATA_REVISION,
        subjects: list[str] = [],  # noqa: B006 (KFP reads defaults from the signature)
        base_model: str = BASE_MODEL,
        config_overrides: list[str] = [],  # noqa: B006 (KFP reads defaults from the signature)
        methods: list[str] = DEFAULT_METHODS,  # noqa: B006 (KFP reads defaults from the signature)
        seeds: list[int] = SEEDS,  # noqa: B006 (KFP reads defaults from the signature)
        prompt_limit: int = 0,
        mlflow_tracking_uri: str = CLUSTER_TRACKING_URI,
        experiment_name: str = DEFAULT_EXPERIMENT,
    ):
        plan = plan_retraining(data_source=data_source, data_revision=data_revision, subjects=subjects,
                               mlflow_tracking_uri=mlflow_tracking_uri)
        with_credentials(plan.set_display_name("plan").set_container_image(settings.image), settings, data_repo=True)
        with dsl.ParallelFor(plan.output, name="new-subjects") as subject:
            subject_pipeline(subject=subject, data_source=data_source, data_revision=data_revision,
                             base_model=base_model, config_overrides=config_overrides, methods=methods,
                             seeds=seeds, prompt_limit=prompt_limit, mlflow_tracking_uri=mlflow_tracking_uri,
                             experiment_name=experiment_name)

    return retrain_new_subjects


retrain_new_subjects = build_pipeline()
PIPELINE_FILE = "retrain_new_subjects.yaml"


def compile_pipeline(output_dir: str | Path = COMPILED_DIR, settings: CompileSettings | None = None) -> Path:
    """Compile to ``output_dir/retrain_new_subjects.yaml``; return the path."""
    path = Path(output_dir) / PIPELINE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(settings), str(path))
    return path


if __name__ == "__main__":
    print(compile_pipeline())
