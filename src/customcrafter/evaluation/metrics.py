"""Metric arithmetic on L2-normalised features (cosine similarity = dot product). Pure functions, no models.

Averaging follows the paper's reference scripts: CLIP-T is the mean over frames of cos(frame, prompt); CLIP-I and
DINO-I take, for each (video, reference image) pair, the mean over frames of cos(frame, image), then the mean over
pairs (equal to the mean of the full frames × references similarity matrix); temporal consistency is the mean over
consecutive frame pairs of cos(f_i, f_{i+1}).
"""

from __future__ import annotations

import torch

__all__ = ["text_alignment", "image_alignment", "temporal_consistency"]


def _check(features: torch.Tensor, name: str) -> None:
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(
            f"{name}: expected a non-empty (N, D) feature matrix, got shape {tuple(features.shape)}"
        )


def text_alignment(frame_features: torch.Tensor, text_feature: torch.Tensor) -> float:
    """CLIP-T: mean over frames of cos(frame, text). ``frame_features (T, D)``, ``text_feature (D,)`` or ``(1, D)``."""
    _check(frame_features, "frame features")
    return float((frame_features @ text_feature.reshape(-1)).mean())


def image_alignment(frame_features: torch.Tensor, reference_features: torch.Tensor) -> float:
    """CLIP-I / DINO-I: mean over reference images of (mean over frames of cos(frame, reference))."""
    _check(frame_features, "frame features")
    _check(reference_features, "reference features")
    per_reference = (frame_features @ reference_features.T).mean(dim=0)  # (R,)
    return float(per_reference.mean())


def temporal_consistency(frame_features: torch.Tensor) -> float:
    """Mean over the T-1 consecutive frame pairs of cos(f_i, f_{i+1}); needs at least two frames."""
    _check(frame_features, "frame features")
    if frame_features.shape[0] < 2:
        raise ValueError("temporal consistency needs at least two frames")
    return float((frame_features[:-1] * frame_features[1:]).sum(dim=-1).mean())
