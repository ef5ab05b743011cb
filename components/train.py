"""Train step: learn one subject module with one method (CustomCrafter or a baseline) on the base model."""


from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from customcrafter.orchestration.settings import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def train_subject(
    subject_data: Input[Dataset],
    augmented: Input[Dataset],
    subject: str,
    method: str,
    base_model: str,
    config_overrides: list[str],
    mlflow_tracking_uri: str,
    experiment_name: str,
    subject_module: Output[Model],
    training: Output[Metrics],
    pipeline_job: str = "",
):
    """Train ``method`` on ``subject``; the module goes to ``subject_module``, the loss curve to MLflow.

    Uses every visible GPU: more than one launches ``accelerate launch --num_processes <GPUs>``. ``pipeline_job``
    (the run's id) keys the checkpoints on the model-cache volume, so a retried pod resumes.
    """
    from customcrafter.orchestration.local_run import train_step

    result = train_step(subject_data=subject_data.path, subject_metadata=dict(subject_data.metadata),
                        augmented=augmented.path, subject=subject, method=method, base_model=base_model,
                        config_overrides=config_overrides, module_dir=subject_module.path,
                        tracking_uri=mlflow_tracking_uri, experiment=experiment_name, pipeline_job=pipeline_job)
    subject_module.metadata.update(result.metadata)
    for name, value in result.metrics.items():
        training.log_metric(name, value)
