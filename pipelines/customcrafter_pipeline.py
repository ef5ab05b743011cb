"""The CustomCrafter pipeline: validate → augment → train (CustomCrafter + baselines) → sample → evaluate
(+ report) → register, per subject.

The file only wires tasks and sets their resources; every step is a component of ``components/``.

- ``subject_pipeline``: one subject. Validation gates everything after it (``dsl.If``): invalid data trains
  nothing and registers nothing. Methods train and sample in a ``dsl.ParallelFor``; the evaluation and the
  registration collect all of them (``dsl.Collected``).
- ``customcrafter_pipeline``: a ``dsl.ParallelFor`` over ``subjects`` running ``subject_pipeline`` for each.

Compile (writes pipelines/compiled/customcrafter_pipeline.yaml)::

    python -m pipelines.customcrafter_pipeline          # or: customcrafter pipeline compile
    CUSTOMCRAFTER_TRAIN_GPUS=8 python -m pipelines.customcrafter_pipeline
"""

from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import (
    augment_data,
    evaluate_methods,
    register_subject,
    sample_videos,
    train_subject,
    validate_data,
)
from customcrafter.orchestration.kfp_client import DEFAULT_GPU_SCHEDULING, apply_gpu_scheduling
from customcrafter.orchestration.settings import (
    CLUSTER_TRACKING_URI,
    COMPILED_DIR,
    DATA_REPO_SECRETS,
    DEFAULT_EXPERIMENT,
    DEFAULT_METHODS,
    OPTIONAL_SECRETS,
    SHM_SIZE,
    CompileSettings,
    compile_settings,
)

# Cluster defaults of the pipeline parameters (the local run passes its own).
DATA_SOURCE = "https://github.com/customcrafter/customcrafter.git"
DATA_REVISION = "main"
BASE_MODEL = "VideoCrafter/VideoCrafter2"
SEEDS = [0, 1, 2]
TRAIN_RETRIES = 2


def with_credentials(task: dsl.PipelineTask, settings: CompileSettings, data_repo: bool = False) -> dsl.PipelineTask:
    """MLflow (required) and S3 (optional: a DVC remote in S3) credentials from Kubernetes secrets; with
    ``data_repo`` (only the tasks that clone ``data_source``), also a private data repository's optional git
    credentials, which the step gives to git from the environment, never in a URL or an argument. No caching
    (every step writes to MLflow, so a cached step would leave the tracking server without its record)."""
    for secret, keys in settings.secrets.items():
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=keys)
    for secret, keys in (OPTIONAL_SECRETS | (DATA_REPO_SECRETS if data_repo else {})).items():
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=keys, optional=True)
    task.set_caching_options(False)
    return task


def build_subject_pipeline(settings: CompileSettings):
    """The per-subject pipeline, with the image, GPU counts, GPU placement and secrets of ``settings``."""
    scheduling = settings.gpu_scheduling or DEFAULT_GPU_SCHEDULING

    @dsl.pipeline(name="customcrafter-subject",
                  description="Validate, augment, train CustomCrafter and baselines, sample, evaluate and "
                              "register one subject.")
    def subject_pipeline(
        subject: str,
        data_source: str = DATA_SOURCE,
        data_revision: str = DATA_REVISION,
        base_model: str = BASE_MODEL,
        config_overrides: list[str] = [],  # noqa: B006 (KFP reads defaults from the signature)
        methods: list[str] = DEFAULT_METHODS,  # noqa: B006 (KFP reads defaults from the signature)
        seeds: list[int] = SEEDS,  # noqa: B006 (KFP reads defaults from the signature)
        prompt_limit: int = 0,
        mlflow_tracking_uri: str = CLUSTER_TRACKING_URI,
        experiment_name: str = DEFAULT_EXPERIMENT,
    ):
        validate = validate_data(data_source=data_source, data_revision=data_revision, subject=subject,
                                 mlflow_tracking_uri=mlflow_tracking_uri, experiment_name=experiment_name,
                                 pipeline_job=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        with_credentials(validate.set_display_name("validate").set_container_image(settings.image), settings,
                         data_repo=True)
        # The local runner resolves a condition only on a task's single unnamed output, hence `-> bool`.
        with dsl.If(validate.outputs["Output"] == True, name="data-valid"):  # noqa: E712 (KFP condition)
            augment = augment_data(subject_data=validate.outputs["subject_data"], subject=subject,
                                   config_overrides=config_overrides, seed=0)
            augment.set_display_name("augment").set_caching_options(False).set_container_image(settings.image)

            with dsl.ParallelFor(methods, name="methods") as method:
                train = train_subject(subject_data=validate.outputs["subject_data"],
                                      augmented=augment.outputs["augmented"], subject=subject, method=method,
                                      base_model=base_model, config_overrides=config_overrides,
                                      mlflow_tracking_uri=mlflow_tracking_uri, experiment_name=experiment_name,
                                      pipeline_job=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
                with_credentials(train.set_display_name("train").set_container_image(settings.image), settings)
                # a preempted or failed pod is retried and resumes from its checkpoints on the model-cache volume
                train.set_retry(num_retries=TRAIN_RETRIES, backoff_duration="60s", backoff_factor=2)
                apply_gpu_scheduling(train, gpus=settings.train_gpus, scheduling=scheduling)
                kubernetes.empty_dir_mount(train, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                           size_limit=SHM_SIZE)
                train.set_cpu_request("8").set_memory_request("64G")

                sample = sample_videos(subject_data=validate.outputs["subject_data"],
                                       subject_module=train.outputs["subject_module"], subject=subject,
                                       base_model=base_model, config_overrides=config_overrides, seeds=seeds,
                                       prompt_limit=prompt_limit)
                sample.set_display_name("sample").set_caching_options(False).set_container_image(settings.image)
                apply_gpu_scheduling(sample, gpus=settings.sample_gpus, scheduling=scheduling)

            evaluate = evaluate_methods(samples=dsl.Collected(sample.outputs["samples"]),
                                        config_overrides=config_overrides,
                                        mlflow_tracking_uri=mlflow_tracking_uri, experiment_name=experiment_name)
            with_credentials(evaluate.set_display_name("evaluate + report").set_container_image(settings.image),
                             settings)
            apply_gpu_scheduling(evaluate, gpus=settings.evaluate_gpus, scheduling=scheduling)

            register = register_subject(subject_data=validate.outputs["subject_data"],
                                        subject_modules=dsl.Collected(train.outputs["subject_module"]),
                                        metrics=evaluate.outputs["metrics"], subject=subject,
                                        base_model=base_model, data_revision=data_revision,
                                        mlflow_tracking_uri=mlflow_tracking_uri, experiment_name=experiment_name)
            with_credentials(register.set_display_name("register").set_container_image(settings.image), settings)

    return subject_pipeline


def build_pipeline(settings: CompileSettings | None = None):
    """The pipeline over a list of subjects (``settings``: compile-time knobs, default from the environment)."""
    subject_pipeline = build_subject_pipeline(settings or compile_settings())

    @dsl.pipeline(name="customcrafter",
                  description="CustomCrafter subject customization with baselines, evaluation and registry "
                              "promotion, for each subject.")
    def customcrafter_pipeline(
        subjects: list[str] = ["dog"],  # noqa: B006 (KFP reads defaults from the signature)
        data_source: str = DATA_SOURCE,
        data_revision: str = DATA_REVISION,
        base_model: str = BASE_MODEL,
        config_overrides: list[str] = [],  # noqa: B006 (KFP reads defaults from the signature)
        methods: list[str] = DEFAULT_METHODS,  # noqa: B006 (KFP reads defaults from the signature)
        seeds: list[int] = SEEDS,  # noqa: B006 (KFP reads defaults from the signature)
        prompt_limit: int = 0,
        mlflow_tracking_uri: str = CLUSTER_TRACKING_URI,
        experiment_name: str = DEFAULT_EXPERIMENT,
    ):
        with dsl.ParallelFor(subjects, name="subjects") as subject:
            subject_pipeline(subject=subject, data_source=data_source, data_revision=data_revision,
                             base_model=base_model, config_overrides=config_overrides, methods=methods,
                             seeds=seeds, prompt_limit=prompt_limit, mlflow_tracking_uri=mlflow_tracking_uri,
                             experiment_name=experiment_name)

    return customcrafter_pipeline


customcrafter_pipeline = build_pipeline()
PIPELINE_FILE = "customcrafter_pipeline.yaml"


def compile_pipeline(output_dir: str | Path = COMPILED_DIR, settings: CompileSettings | None = None) -> Path:
    """Compile to ``output_dir/customcrafter_pipeline.yaml`` (IR YAML + platform spec); return the path."""
    path = Path(output_dir) / PIPELINE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(settings), str(path))
    return path


if __name__ == "__main__":
    print(compile_pipeline())
