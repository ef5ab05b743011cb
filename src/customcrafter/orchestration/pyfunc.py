"""The registered model: an MLflow pyfunc that turns prompts into videos with a base model + a subject module.

What MLflow stores per version is small: the subject module folder (artifact ``subject_module``) and a model
config with the base model id (``"tiny"``, a hub id, a checkpoint path...). The base weights are not copied
into the registry; :meth:`CustomCrafterVideoModel.load_context` loads them through
``customcrafter.loading.load_base_pipeline`` (with its cache), then applies the subject module. So
``mlflow.pyfunc.load_model("models:/customcrafter-dog@champion").predict(pd.DataFrame({"prompt": [...]}))``
works in any process that has the ``customcrafter`` package (the project image).
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

__all__ = ["CustomCrafterVideoModel", "SUBJECT_MODULE_ARTIFACT", "SAMPLING_COLUMNS", "input_signature"]

logger = logging.getLogger(__name__)

SUBJECT_MODULE_ARTIFACT = "subject_module"
# Optional per-row sampling settings, with their MLflow column types.
SAMPLING_COLUMNS = {"seed": "long", "num_inference_steps": "long", "num_frames": "long", "height": "long",
                    "width": "long"}


def input_signature():
    """``prompt`` (required string) plus the optional integer columns of :data:`SAMPLING_COLUMNS`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    columns = [ColSpec("string", "prompt")]
    columns += [ColSpec(kind, name, required=False) for name, kind in SAMPLING_COLUMNS.items()]
    return ModelSignature(inputs=Schema(columns))


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


#: ``model_config`` written with torch's dtype names (older registrations) → SpeedConfig's.
_TORCH_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class CustomCrafterVideoModel(mlflow.pyfunc.PythonModel):
    """Prompts in, videos out. ``model_config``: ``base_model_id`` (required), ``method``, ``device`` (default: CUDA
    when available), ``dtype`` (``fp32``/``bf16``/``fp16``, default bf16 - GPU only, the CPU keeps fp32) and
    ``compile`` (``none``/``regional``/``full``: see ``performance.SpeedConfig``; worth it for a long-lived server)."""

    def load_context(self, context) -> None:
        # Imported here: MLflow imports this module to unpickle the model long before the model code is needed,
        # and registration must not pull in the whole diffusion stack.
        from customcrafter.loading import load_base_pipeline
        from customcrafter.performance import SpeedConfig, optimize_pipeline
        from customcrafter.subject_module import load_subject_module
        from customcrafter.utils import pick_device

        config = dict(context.model_config or {})
        if "base_model_id" not in config:
            raise ValueError("model_config: 'base_model_id' is missing (registered without it?)")
        self.config = config
        dtype = str(config.get("dtype", "bf16"))
        dtype = _TORCH_DTYPE_NAMES.get(dtype, dtype)
        speed = SpeedConfig(dtype=dtype, compile=config.get("compile", "none"))
        module_dir = context.artifacts[SUBJECT_MODULE_ARTIFACT]
        logger.info("loading base model %r and subject module %s", config["base_model_id"], module_dir)
        self.pipe = load_base_pipeline(config["base_model_id"], device=pick_device(config.get("device")))
        load_subject_module(self.pipe, module_dir)
        optimize_pipeline(self.pipe, speed)  # after the module: DWVSS fuses LoRA scales into the optimised weights

    # model_input's type hint: MLflow warns on a PythonModel whose predict has none. A DataFrame hint is one it accepts
    # without inferring a schema or validating against it: the registered signature (input_signature) stays the one
    # the input is checked against, as before.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[np.ndarray]:
        """``model_input``: a DataFrame with ``prompt`` and optional :data:`SAMPLING_COLUMNS` per row.

        Returns a list with one video per row, as ``customcrafter.sampling.sample_video`` gives it
        (uint8 frames ``(T, H, W, 3)``).
        """
        from customcrafter.sampling import sample_video

        if "prompt" not in model_input.columns:
            raise ValueError(f"model_input: a 'prompt' column is required, got columns {list(model_input.columns)}")
        accepted = inspect.signature(sample_video).parameters
        videos = []
        for row in model_input.to_dict(orient="records"):
            kwargs = {k: int(row[k]) for k in SAMPLING_COLUMNS if k in row and _present(row[k])}
            if "method" in accepted and self.config.get("method"):
                kwargs["method"] = self.config["method"]
            kwargs.update({k: v for k, v in (params or {}).items() if k in accepted})
            videos.append(sample_video(self.pipe, row["prompt"], **kwargs))
        return videos
