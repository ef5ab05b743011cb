"""Register step: log the CustomCrafter subject module as a pyfunc model and apply the promotion gate."""


from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model

from customcrafter.orchestration.settings import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def register_subject(
    subject_data: Input[Dataset],
    subject_modules: Input[list[Model]],
    metrics: Input[Metrics],
    subject: str,
    base_model: str,
    data_revision: str,
    mlflow_tracking_uri: str,
    experiment_name: str,
) -> str:
    """Register the subject's CustomCrafter module (alias ``challenger``); move ``champion`` to it only when
    it passes the promotion gate against the current champion. Returns a one-line summary."""
    from customcrafter.orchestration.local_run import register_step

    result = register_step(subject_data=subject_data.path, subject_metadata=dict(subject_data.metadata),
                           modules=[(m.path, dict(m.metadata)) for m in subject_modules],
                           metrics=dict(metrics.metadata), subject=subject, base_model=base_model,
                           data_revision=data_revision, tracking_uri=mlflow_tracking_uri,
                           experiment=experiment_name)
    return result.value
