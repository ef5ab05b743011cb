"""Motion: dense optical flow between consecutive frames (OpenCV Farnebäck, classical, no learned weights).

Temporal consistency alone rewards frozen videos; the paper's claim is that CustomCrafter keeps the base model's
motion, so we also measure how much things move:

- ``motion``: the mean flow magnitude (pixels per frame) over all pixels and all consecutive frame pairs.
- ``dynamic_degree`` (VBench style): a frame pair's score is the mean of its largest ``top_fraction`` (5%) flow
  magnitudes; a pair moves if its score exceeds ``threshold_per_256 · min(H, W) / 256``; the video moves (flag 1)
  if at least ``round(pairs_per_16_frames · T / 16)`` pairs move. Aggregated, it is the fraction of moving videos.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from customcrafter.evaluation.config import FlowConfig

__all__ = ["MotionStats", "flow_magnitudes", "top_fraction_mean", "dynamic_degree_flag", "motion_stats"]


@dataclass(frozen=True)
class MotionStats:
    motion: float  # mean flow magnitude, pixels per frame
    dynamic_degree: float  # 1.0 if the video moves, else 0.0
    pair_scores: list[float]  # per frame pair: mean of the top `top_fraction` magnitudes


def _gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def flow_magnitudes(frames: np.ndarray, config: FlowConfig | None = None) -> list[np.ndarray]:
    """Per consecutive pair of ``frames (T, H, W, 3) uint8``, the ``(H, W)`` Farnebäck flow magnitude."""
    config = config or FlowConfig()
    if frames.ndim != 4 or frames.shape[0] < 2 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (T>=2, H, W, 3), got shape {frames.shape}")
    grays = [_gray(f) for f in frames]
    magnitudes = []
    for previous, current in zip(grays[:-1], grays[1:], strict=True):
        flow = cv2.calcOpticalFlowFarneback(
            previous,
            current,
            None,
            config.pyr_scale,
            config.levels,
            config.winsize,
            config.iterations,
            config.poly_n,
            config.poly_sigma,
            0,
        )
        magnitudes.append(np.linalg.norm(flow, axis=-1))
    return magnitudes


def top_fraction_mean(magnitude: np.ndarray, fraction: float) -> float:
    """Mean of the largest ``fraction`` of the values (at least one value)."""
    values = np.sort(magnitude.reshape(-1))
    count = max(1, int(round(values.size * fraction)))
    return float(values[-count:].mean())


def dynamic_degree_flag(
    pair_scores: list[float], height: int, width: int, num_frames: int, config: FlowConfig | None = None
) -> bool:
    """VBench's rule: enough frame pairs whose top-magnitude score exceeds a resolution-scaled threshold."""
    config = config or FlowConfig()
    threshold = config.threshold_per_256 * min(height, width) / 256.0
    needed = max(1, round(config.pairs_per_16_frames * num_frames / 16.0))
    return sum(score > threshold for score in pair_scores) >= needed


def motion_stats(frames: np.ndarray, config: FlowConfig | None = None) -> MotionStats:
    """Mean flow magnitude and dynamic-degree flag of one video ``(T, H, W, 3) uint8``."""
    config = config or FlowConfig()
    magnitudes = flow_magnitudes(frames, config)
    scores = [top_fraction_mean(m, config.top_fraction) for m in magnitudes]
    moving = dynamic_degree_flag(scores, frames.shape[1], frames.shape[2], frames.shape[0], config)
    return MotionStats(
        motion=float(np.mean([m.mean() for m in magnitudes])),
        dynamic_degree=float(moving),
        pair_scores=scores,
    )
