"""`EvalConfig`: how videos are scored. Defaults reproduce the paper's evaluation protocol (reference scripts)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field

from customcrafter.config import StrictModel

__all__ = [
    "EvalConfig",
    "FlowConfig",
    "ReportConfig",
    "METRIC_NAMES",
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
]

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"

# The metric keys of every result table and of `EvalResult.metrics` (the MLflow promotion gate reads these names).
METRIC_NAMES = ("clip_t", "clip_i", "dino_i", "temporal_consistency", "motion", "dynamic_degree")


class FlowConfig(StrictModel):
    """Dense optical flow (OpenCV Farnebäck; classical, no learned weights) and the VBench-style dynamic degree."""

    pyr_scale: float = Field(0.5, gt=0, lt=1, description="Farnebäck pyramid scale between levels.")
    levels: int = Field(3, ge=1, description="Farnebäck pyramid levels (more levels follow larger motion).")
    winsize: int = Field(15, ge=3, description="Farnebäck averaging window (pixels).")
    iterations: int = Field(3, ge=1, description="Farnebäck iterations per pyramid level.")
    poly_n: int = Field(5, ge=3, description="Farnebäck pixel neighbourhood for the polynomial expansion.")
    poly_sigma: float = Field(1.2, gt=0, description="Farnebäck Gaussian sigma of the polynomial expansion.")
    top_fraction: float = Field(
        0.05,
        gt=0,
        le=1,
        description="Dynamic degree: a frame pair's score is the mean of its largest "
        "flow magnitudes, this fraction of the pixels (VBench: top 5%).",
    )
    threshold_per_256: float = Field(
        4.0,
        gt=0,
        description="Dynamic degree: a pair moves if its score exceeds "
        "threshold_per_256 * min(H, W) / 256 pixels.",
    )
    pairs_per_16_frames: float = Field(
        4.0,
        gt=0,
        description="Dynamic degree: a video moves if at least "
        "round(pairs_per_16_frames * T / 16) pairs move.",
    )


class ReportConfig(StrictModel):
    """What the HTML report embeds. The video grid is a preview; the tables always use every video."""

    grid_max_subjects: int | None = Field(
        6, ge=1, description="Subjects shown in the video grid (None: all)."
    )
    grid_gif_size: int = Field(128, ge=16, description="Long side of the GIFs embedded in the grid (pixels).")
    grid_fps: float = Field(8.0, gt=0, description="Playback rate of the embedded GIFs.")
    reference_thumb_size: int = Field(96, ge=16, description="Long side of the reference-image thumbnails.")
    show_paper_table: bool = Field(
        True, description="Show the paper's Table 1 numbers beside ours, labelled."
    )


class EvalConfig(StrictModel):
    """Evaluation settings. Every default follows the paper's reference evaluation scripts."""

    clip_model: str = Field(
        DEFAULT_CLIP_MODEL, description="CLIP (hub id or local folder) for CLIP-T/CLIP-I/T.Cons."
    )
    dino_model: str = Field(DEFAULT_DINO_MODEL, description="DINO ViT (hub id or local folder) for DINO-I.")
    device: str = Field("auto", description="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...")
    batch_size: int = Field(32, ge=1, description="Images per forward pass of the feature models.")
    token_handling: Literal["replace", "drop", "keep"] = Field(
        "replace",
        description="CLIP-T text. 'replace': the placeholder token becomes the class word, i.e. the subject phrase "
        "'<new1> dog' reads 'dog' (our default; the paper's scripts don't say). 'drop': the token is "
        "deleted from the prompt text and nothing put in its place (differs from 'replace' only when "
        "the token stands without its class word). 'keep': the raw prompt, token included.",
    )
    dino_preprocess: Literal["squash", "resize_crop"] = Field(
        "squash",
        description="DINO-I input: 'squash' to 224x224 (reference scripts) or 'resize_crop' = resize short side "
        "256 then centre-crop 224 (DreamVideo's script).",
    )
    max_frames: int | None = Field(
        None, ge=2, description="Score only the first N frames (None: all, as the paper)."
    )
    confidence: float = Field(
        0.95, gt=0, lt=1, description="Confidence level of the across-subject t-interval."
    )
    flow: FlowConfig = Field(default_factory=FlowConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    def metric_hash(self) -> str:
        """Hash of everything that changes a video's metric values (not the report, device or batch size)."""
        relevant = self.model_dump(
            mode="json",
            include={"clip_model", "dino_model", "token_handling", "dino_preprocess", "max_frames", "flow"},
        )
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
