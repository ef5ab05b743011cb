"""Kubeflow Pipelines v2 components: one per pipeline step, each a thin typed wrapper over a function of
``customcrafter.orchestration.local_run`` (imported inside the component, so the same code runs in the
project image on a cluster and in KFP's local SubprocessRunner)."""

from components.augment import augment_data
from components.evaluate import evaluate_methods
from components.plan import plan_retraining
from components.register import register_subject
from components.sample import sample_videos
from components.train import train_subject
from components.validate import validate_data

__all__ = ["validate_data", "augment_data", "train_subject", "sample_videos", "evaluate_methods",
           "register_subject", "plan_retraining"]
