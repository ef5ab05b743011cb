"""Sample step: generate the evaluation prompts' videos with one trained subject module."""


from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from customcrafter.orchestration.settings import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def sample_videos(
    subject_data: Input[Dataset],
    subject_module: Input[Model],
    subject: str,
    base_model: str,
    config_overrides: list[str],
    seeds: list[int],
    prompt_limit: int,
    samples: Output[Dataset],
):
    """Videos + ``manifest.jsonl`` (the evaluation's input). CustomCrafter modules sample with DWVSS,
    baselines with plain sampling (chosen by the module's method)."""
    from customcrafter.orchestration.local_run import sample_step

    result = sample_step(subject_data=subject_data.path, module_dir=subject_module.path,
                         module_metadata=dict(subject_module.metadata), subject=subject, base_model=base_model,
                         config_overrides=config_overrides, seeds=seeds, prompt_limit=prompt_limit,
                         out_dir=samples.path)
    samples.metadata.update(result.metadata)
