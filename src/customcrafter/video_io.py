"""Write and read videos as uint8 frames (T, H, W, 3). Writes go to a temporary file, then a rename, so a reader never
sees half a video."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from customcrafter.utils import created_mode


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.shape[0] == 0:
        raise ValueError("frames: empty video (T = 0)")
    return frames


@contextlib.contextmanager
def _atomic_target(path: Path):
    """Yield a temporary path with the same suffix beside ``path``; renamed onto ``path`` on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, created_mode("file"))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def export_mp4(frames: np.ndarray, path: str | Path, fps: int = 8, quality: int = 9) -> Path:
    """H.264 MP4 (yuv420p, so sizes are padded up to even by the encoder's macro-block size when needed)."""
    import imageio.v2 as imageio

    frames = _check_frames(frames)
    path = Path(path)
    with _atomic_target(path) as tmp:
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=quality,
                                    pixelformat="yuv420p", macro_block_size=2)
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
    return path


def export_gif(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Looping GIF."""
    from PIL import Image

    frames = _check_frames(frames)
    path = Path(path)
    images = [Image.fromarray(f) for f in frames]
    with _atomic_target(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=max(1, round(1000 / fps)), loop=0)
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Frames of an MP4/GIF/… as uint8 (T, H, W, 3)."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: video not found")
    frames = np.asarray(iio.imread(path, index=None))
    if frames.ndim == 3:  # a single frame
        frames = frames[None]
    if frames.shape[-1] == 4:
        frames = frames[..., :3]
    return np.ascontiguousarray(frames.astype(np.uint8))
