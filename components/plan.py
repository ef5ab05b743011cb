"""Plan step of scheduled retraining: which subjects are new or changed since they were last registered."""


from kfp import dsl

from customcrafter.orchestration.settings import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def plan_retraining(
    data_source: str,
    data_revision: str,
    subjects: list[str],
    mlflow_tracking_uri: str,
) -> list[str]:
    """The subjects at ``data_revision`` (all, or only those in ``subjects`` when it is not empty) whose content
    hash has no registered model version yet."""
    from customcrafter.orchestration.local_run import plan_step

    return plan_step(data_source=data_source, data_revision=data_revision, subjects=subjects,
                     tracking_uri=mlflow_tracking_uri)
