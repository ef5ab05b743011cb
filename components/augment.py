"""Augment step: materialise the zoom/mask-augmented training examples of one subject (with a preview)."""


from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from customcrafter.orchestration.settings import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def augment_data(
    subject_data: Input[Dataset],
    subject: str,
    config_overrides: list[str],
    seed: int,
    augmented: Output[Dataset],
):
    """Write ``augment.num_examples`` augmented examples (pixels, mask, prompt prefix) and ``preview.png``."""
    from customcrafter.orchestration.local_run import augment_step

    result = augment_step(subject_data=subject_data.path, subject=subject, out_dir=augmented.path,
                          config_overrides=config_overrides, seed=seed)
    augmented.metadata.update(result.metadata)
