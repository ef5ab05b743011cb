"""Validate step: fetch one subject's data at a DVC revision and check it with Great Expectations."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Metrics, Output

from customcrafter.orchestration.settings import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def validate_data(
    data_source: str,
    data_revision: str,
    subject: str,
    mlflow_tracking_uri: str,
    experiment_name: str,
    pipeline_job: str,
    subject_data: Output[Dataset],
    data_docs: Output[HTML],
    validation: Output[Metrics],
) -> bool:
    """Fetch ``subject`` (a local data root, or a git repository URL + DVC revision) into ``subject_data``,
    validate it (GX data docs in ``data_docs``), open the subject's MLflow pipeline run; return whether it passed.

    The pipeline trains and registers only when this returns True.
    """
    from customcrafter.orchestration.local_run import validate_step

    result = validate_step(data_source=data_source, data_revision=data_revision, subject=subject,
                           out_dir=subject_data.path, html_path=data_docs.path,
                           tracking_uri=mlflow_tracking_uri, experiment=experiment_name, pipeline_job=pipeline_job)
    subject_data.metadata.update(result.metadata)
    data_docs.metadata.update({"subject": subject, "passed": result.value})
    for name, value in result.metrics.items():
        validation.log_metric(name, value)
    return result.value
