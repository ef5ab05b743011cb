"""Small readers for what evaluation looks at: generated videos (MP4/GIF) and a subject's reference images.

Videos are read with imageio + PIL only, so that evaluation can score videos written by any tool. Reference images
are listed and read as training reads the subject (``customcrafter.data``: the same file types, EXIF rotation
applied, transparency flattened on white), so the videos are scored against the images the module learnt.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image

from customcrafter.data.images import load_rgb
from customcrafter.data.subjects import IMAGE_SUFFIXES, iter_image_files

__all__ = [
    "read_video_frames",
    "reference_image_paths",
    "load_rgb_image",
    "file_sha256",
    "encode_gif",
    "encode_png_thumbnail",
    "IMAGE_SUFFIXES",
]

logger = logging.getLogger(__name__)


def _to_rgb_uint8(frames: np.ndarray, path: Path) -> np.ndarray:
    if frames.ndim == 3:  # (T, H, W) grayscale
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise ValueError(f"{path}: expected video frames (T, H, W, 3), got shape {frames.shape}")
    frames = frames[..., :3]
    if frames.dtype != np.uint8:
        frames = np.clip(frames, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(frames)


def _read_gif(path: Path, num_frames: int | None = None) -> np.ndarray:
    """GIF frames, with the frames that GIF writers merged back in place.

    Writers (Pillow among them) merge identical consecutive frames into one frame of longer duration; a still
    video would read as a single frame. GIF stores durations in centiseconds, so a frame written for 125 ms is
    stored as 120 ms and 13 merged ones as 1620 ms (13.5 × 120). With ``num_frames`` (the count the video was
    written with, e.g. from its manifest) the frames are spread over it in proportion to their durations, which
    is exact. Without it each stored frame counts ``floor(duration / shortest)`` frames: exact for writers that
    truncate to centiseconds (Pillow, imageio) up to 23 merged frames at any frame rate.
    """
    frames, durations = [], []
    with Image.open(path) as image:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB")))
            durations.append(float(image.info.get("duration") or 0))
    positive = [d for d in durations if d > 0]
    if num_frames is not None:
        if num_frames < len(frames):
            raise ValueError(f"{path}: the GIF holds {len(frames)} frames, more than the {num_frames} it was written "
                             f"with (manifest 'sampling.num_frames')")
        repeats = _spread(num_frames, [d if d > 0 else min(positive, default=1.0) for d in durations])
    elif positive:
        shortest = min(positive)
        repeats = [max(1, int(d / shortest + 1e-6)) if d > 0 else 1 for d in durations]
    else:
        repeats = [1] * len(frames)
    frames = [frame for frame, count in zip(frames, repeats, strict=True) for _ in range(count)]
    if len(frames) == 1:
        # Every frame was identical and merged into one: the frame count is lost, but each metric of a frozen
        # video (consistency 1, motion 0, frame means of CLIP/DINO similarity) is the same for any count.
        logger.info(
            "%s: one GIF frame (identical frames merged by the writer); scored as a still video", path
        )
        frames = frames * 2
    return np.stack(frames)


def _spread(total: int, weights: list[float]) -> list[int]:
    """``total`` split over ``weights`` in proportion, each part at least 1 (largest remainder)."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [max(1, int(share)) for share in shares]
    order = sorted(range(len(weights)), key=lambda i: counts[i] - shares[i])  # furthest below its share first
    while sum(counts) < total:
        counts[order.pop(0)] += 1
    for i in reversed(order):  # over (the floor of 1): take from those furthest above their share
        if sum(counts) == total:
            break
        if counts[i] > 1:
            counts[i] -= 1
    return counts


def read_video_frames(path: str | Path, max_frames: int | None = None, num_frames: int | None = None) -> np.ndarray:
    """All frames of an MP4/GIF (or any format imageio reads) as uint8 ``(T, H, W, 3)``. ``num_frames``: the count
    the video was written with, if known; a GIF's merged frames are restored to it (``_read_gif``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: video not found")
    try:
        frames = (
            _read_gif(path, num_frames) if path.suffix.lower() == ".gif" else np.asarray(iio.imread(path, index=None))
        )
    except Exception as exc:  # noqa: BLE001 - imageio raises many types; the user needs the file name
        raise ValueError(f"{path}: cannot read video ({exc})") from exc
    if frames.ndim == 3 and frames.shape[-1] in (3, 4) and path.suffix.lower() not in {".gif", ".mp4"}:
        frames = frames[None]  # a single still image
    frames = _to_rgb_uint8(frames, path)
    if max_frames is not None:
        frames = frames[:max_frames]
    if frames.shape[0] < 2:
        raise ValueError(f"{path}: a video needs at least two frames, found {frames.shape[0]}")
    return frames


def reference_image_paths(subject_dir: str | Path) -> list[Path]:
    """The subject's images (sorted), the files training reads; ``subject.yaml``, other files and hidden files are
    ignored."""
    subject_dir = Path(subject_dir)
    if not subject_dir.is_dir():
        raise FileNotFoundError(f"{subject_dir}: subject folder not found")
    paths = iter_image_files(subject_dir)
    if not paths:
        raise ValueError(f"{subject_dir}: no reference images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def load_rgb_image(path: str | Path) -> np.ndarray:
    """uint8 ``(H, W, 3)``, as training reads it (EXIF rotation applied, transparency flattened on white)."""
    try:
        return np.asarray(load_rgb(path))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read image ({exc})") from exc


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _downscale(frame: np.ndarray, long_side: int) -> Image.Image:
    image = Image.fromarray(frame)
    scale = long_side / max(image.size)
    if scale < 1:
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample=Image.BILINEAR
        )
    return image


def encode_gif(frames: np.ndarray, long_side: int = 128, fps: float = 8.0) -> bytes:
    """Downscaled looping GIF bytes of ``(T, H, W, 3) uint8`` frames (for embedding in the HTML report)."""
    images = [_downscale(f, long_side) for f in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        loop=0,
        duration=max(20, round(1000 / fps)),
        optimize=True,
    )
    return buffer.getvalue()


def encode_png_thumbnail(image: np.ndarray, long_side: int = 96) -> bytes:
    buffer = io.BytesIO()
    _downscale(image, long_side).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
