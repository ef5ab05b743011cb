"""Metric arithmetic and optical-flow motion on synthetic inputs with known answers (no models)."""

import cv2
import numpy as np
import pytest
import torch

from customcrafter.evaluation.config import FlowConfig
from customcrafter.evaluation.features import clip_preprocess, dino_preprocess
from customcrafter.evaluation.metrics import image_alignment, temporal_consistency, text_alignment
from customcrafter.evaluation.motion import dynamic_degree_flag, motion_stats, top_fraction_mean


def _texture(height=64, width=192, seed=0):
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.random((height, width)).astype(np.float32), (0, 0), 2.0)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return np.repeat((noise * 255).astype(np.uint8)[..., None], 3, axis=-1)


def shifted_video(shift: int, frames: int = 8, size: int = 64) -> np.ndarray:
    """A smooth random texture moving ``shift`` pixels to the right per frame (a window over a wider texture)."""
    texture = _texture(size, size + shift * frames + 32)
    start = shift * frames + 16
    return np.stack([texture[:, start - i * shift : start - i * shift + size] for i in range(frames)])


def _unit(x):
    return torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=-1)


def test_identical_frames_have_consistency_one_and_no_motion():
    frames = np.repeat(_texture(64, 64)[None], 8, axis=0)
    features = _unit(torch.randn(1, 16)).repeat(8, 1)
    assert temporal_consistency(features) == pytest.approx(1.0, abs=1e-6)
    stats = motion_stats(frames)
    assert stats.motion == pytest.approx(0.0, abs=0.01)  # Farnebäck: sub-0.01 px numerical noise
    assert stats.dynamic_degree == 0.0


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_shifted_pattern_gives_its_shift_as_flow(shift):
    stats = motion_stats(shifted_video(shift))
    assert stats.motion == pytest.approx(shift, rel=0.1)


def test_dynamic_degree_follows_threshold_on_real_flow():
    # 64x64 frames: threshold 4 * 64 / 256 = 1 px; a 2 px/frame shift moves, a still video doesn't
    assert motion_stats(shifted_video(2)).dynamic_degree == 1.0
    assert motion_stats(np.repeat(shifted_video(2)[:1], 8, axis=0)).dynamic_degree == 0.0


def test_dynamic_degree_flag_toggles_at_threshold_and_count():
    config = FlowConfig()
    threshold = 4.0 * 320 / 256  # 320x512 video: 5 px
    needed = round(4 * 16 / 16)  # 16 frames: 4 moving pairs needed
    below, above = threshold - 1e-3, threshold + 1e-3
    scores = [above] * needed + [below] * (15 - needed)
    assert dynamic_degree_flag(scores, 320, 512, 16, config)
    assert not dynamic_degree_flag([above] * (needed - 1) + [below] * (16 - needed), 320, 512, 16, config)
    assert not dynamic_degree_flag([below] * 15, 320, 512, 16, config)
    assert not dynamic_degree_flag([threshold] * 15, 320, 512, 16, config)  # must exceed, as VBench


def test_top_fraction_mean_uses_the_largest_values():
    magnitude = np.arange(100, dtype=np.float32).reshape(10, 10)
    assert top_fraction_mean(magnitude, 0.05) == pytest.approx(np.mean([95, 96, 97, 98, 99]))


def test_alignment_arithmetic():
    refs = _unit(torch.eye(4)[:2])  # two orthogonal reference features
    frames = refs[[0, 0, 0]]  # every frame equals reference 0
    assert image_alignment(refs, refs) == pytest.approx(0.5)  # (mean cos to ref0 = .5, to ref1 = .5)
    assert image_alignment(frames, refs[:1]) == pytest.approx(1.0)
    assert image_alignment(frames, refs) == pytest.approx(0.5)  # mean over pairs of the per-pair frame mean
    assert text_alignment(frames, refs[0]) == pytest.approx(1.0)
    assert text_alignment(frames, -refs[0]) == pytest.approx(-1.0)
    alternating = torch.stack([refs[0], refs[1], refs[0]])
    assert temporal_consistency(alternating) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="two frames"):
        temporal_consistency(refs[:1])


def test_preprocessing_shapes_and_normalisation():
    image = np.full((40, 80, 3), 255, dtype=np.uint8)
    clip = clip_preprocess(image, 32)
    assert clip.shape == (3, 32, 32)
    assert torch.allclose(
        clip[:, 0, 0],
        (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073]))
        / torch.tensor([0.26862954, 0.26130258, 0.27577711]),
        atol=1e-5,
    )
    # short side resized then centre-cropped: a left/right split image keeps both halves, centred
    split = np.zeros((40, 80, 3), dtype=np.uint8)
    split[:, 40:] = 255
    cropped = clip_preprocess(split, 32)
    assert cropped[0, 16, 2] < 0 < cropped[0, 16, 29]
    assert dino_preprocess(image, 32).shape == (3, 32, 32)
    assert dino_preprocess(image, 32, "resize_crop").shape == (3, 32, 32)
    with pytest.raises(ValueError, match="uint8"):
        clip_preprocess(np.zeros((4, 4), dtype=np.float32))
