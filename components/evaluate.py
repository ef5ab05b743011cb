"""Evaluate step: metrics over every method's videos, and the HTML/Markdown report."""


from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Output

from customcrafter.orchestration.settings import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def evaluate_methods(
    samples: Input[list[Dataset]],
    config_overrides: list[str],
    mlflow_tracking_uri: str,
    experiment_name: str,
    results: Output[Dataset],
    report: Output[HTML],
    summary: Output[Markdown],
    metrics: Output[Metrics],
):
    """CLIP-T, CLIP-I, DINO-I, temporal consistency, motion and dynamic degree per method (``metrics`` holds
    ``<method>.<metric>`` means); logs them and the videos to each method's MLflow run."""
    from customcrafter.orchestration.local_run import evaluate_step

    result = evaluate_step(samples=[(s.path, dict(s.metadata)) for s in samples], out_dir=results.path,
                           report_html=report.path, summary_md=summary.path, config_overrides=config_overrides,
                           tracking_uri=mlflow_tracking_uri, experiment=experiment_name)
    results.metadata.update(result.metadata)
    report.metadata.update(result.metadata)
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
