"""Opening user photos safely, describing them, and normalising them to plain RGB.

Phones and cameras produce CMYK, grayscale, palette, transparent and 16-bit images, and store rotation as an EXIF
tag: those are converted, not rejected. What cannot be used (corrupt, truncated, not an image, a decompression
bomb, too small, absurdly elongated) raises :class:`ImageRejected` with a one-line reason.

Decompression bombs are refused from the header dimensions, before any pixel is decoded. PIL has its own guard
(``Image.MAX_IMAGE_PIXELS``) that warns or raises depending on the size; it is switched off while *we* open a file so
that the limit, and the message, are ours (``ImageLimits.max_pixels``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from pydantic import Field

from customcrafter.config import StrictModel

logger = logging.getLogger(__name__)

__all__ = ["ImageLimits", "ImageRejected", "ImageInfo", "open_checked", "inspect_image", "normalise_image",
           "load_rgb", "ACCEPTED_FORMATS"]

#: PIL format names accepted (MPO is the multi-picture JPEG many phones write).
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "TIFF"})
EXIF_ORIENTATION_TAG = 0x0112
EXIF_ORIENTATIONS = range(1, 9)  # the values the EXIF standard defines; others are a broken tag
#: pixel modes that :func:`normalise_image` turns into 8-bit RGB (PIL's converters, or our alpha and high-bit-depth
#: paths); the validation suite refuses any other
CONVERTIBLE_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "RGBA", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "LAB",
                               "HSV", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


class ImageLimits(StrictModel):
    """What a usable subject photo is. Defaults suit 512x320 training with 3-6 phone photos."""

    min_side: int = Field(256, ge=1, description="shorter side in pixels (after EXIF rotation)")
    max_aspect: float = Field(4.0, ge=1.0, description="longer side / shorter side")
    max_pixels: int = Field(64_000_000, ge=1, description="refuse larger images from the header, undecoded")
    max_side: int = Field(2048, ge=64, description="normalised images are downscaled to this longest side")


class ImageRejected(ValueError):
    """An image cannot be used; ``reason`` is a short phrase, ``path`` the file."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@contextlib.contextmanager
def _our_limits() -> Iterator[None]:
    """Disable PIL's own bomb guard and truncated-image leniency while we open a file (restored afterwards)."""
    saved_pixels, saved_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved_pixels, saved_truncated


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
        return 1


def open_checked(path: str | Path, limits: ImageLimits | None = None) -> Image.Image:
    """Open, check and fully decode an image; returns it with EXIF orientation applied (mode unchanged).

    Raises :class:`ImageRejected` for an empty file, a non-image, an unaccepted format, too many pixels (checked
    from the header, before decoding), corrupt/truncated data, too small a side or too elongated a shape.
    """
    limits = limits or ImageLimits()
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageRejected(path, "empty file")
    with _our_limits():
        try:
            image = Image.open(path)
        except UnidentifiedImageError:
            raise ImageRejected(path, "not an image (its content is not a readable image format)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageRejected(path, f"corrupt image header ({exc})") from None
        if image.format not in ACCEPTED_FORMATS:
            image.close()
            raise ImageRejected(path, f"unsupported format {image.format} (use JPEG, PNG, WebP or TIFF)")
        width, height = image.size
        if width * height > limits.max_pixels:
            image.close()
            raise ImageRejected(path, f"too many pixels ({width}x{height} = {width * height / 1e6:.0f} MP > "
                                      f"{limits.max_pixels / 1e6:g} MP): refused as a possible decompression bomb")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            image.close()
            raise ImageRejected(path, f"corrupt or truncated image ({exc})") from None
    transposed = ImageOps.exif_transpose(image)
    width, height = transposed.size
    if min(width, height) < limits.min_side:
        raise ImageRejected(path, f"too small ({width}x{height}; the shorter side must be >= {limits.min_side} px)")
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect:
        raise ImageRejected(path, f"too elongated ({width}x{height}, aspect {aspect:.1f}:1 > "
                                  f"{limits.max_aspect:g}:1)")
    return transposed


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite a transparent image on white (a black background would read as a dark scene)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale → 8-bit RGB. PIL's own convert clips instead of scaling."""
    array = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        peak = 1.0 if array.max(initial=0) <= 1.0 else 255.0
    else:
        peak = 65535.0 if array.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
    scaled = np.clip(array / peak * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L").convert("RGB")


def normalise_image(image: Image.Image, max_side: int = 2048) -> Image.Image:
    """Any accepted image (already EXIF-transposed by :func:`open_checked`) → 8-bit RGB, longest side <= max_side."""
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgb = _flatten_alpha(image)
    elif mode.startswith("I") or mode == "F":
        rgb = _high_bit_depth_to_rgb(image)
    else:  # RGB, L, 1, P, CMYK, YCbCr, LAB, HSV
        rgb = image.convert("RGB")
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return rgb


@dataclass
class ImageInfo:
    """One manifest row (see :mod:`customcrafter.data.manifest`)."""

    subject: str
    path: str
    format: str | None
    mode: str | None
    width: int | None
    height: int | None
    bytes: int
    sha256: str
    exif_orientation: int | None
    decodable: bool
    error: str | None = None

    def as_row(self) -> dict:
        return asdict(self)


def inspect_image(path: str | Path, subject: str = "", limits: ImageLimits | None = None) -> ImageInfo:
    """Describe a file without raising: size, format, mode, hash, orientation, and whether it decodes.

    Size limits are not applied here (the validation suite judges them), except the pixel-count guard, which
    keeps a bomb from being decoded: such a file is reported as not decodable.
    """
    limits = limits or ImageLimits()
    path = Path(path)
    try:
        data, unreadable = path.read_bytes(), None
    except OSError as exc:  # a broken symlink, no permission: a row that fails, not a crash of the whole run
        data, unreadable = b"", f"unreadable ({exc.strerror or exc.__class__.__name__})"
    info = ImageInfo(subject=subject, path=str(path), format=None, mode=None, width=None, height=None,
                     bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), exif_orientation=None,
                     decodable=False)
    if not data:
        info.error = unreadable or "empty file"
        return info
    relaxed = ImageLimits(min_side=1, max_aspect=1e9, max_pixels=limits.max_pixels, max_side=limits.max_side)
    try:
        with _our_limits(), Image.open(path) as header:
            info.format, info.mode = header.format, header.mode
            info.exif_orientation = _exif_orientation(header)
            info.width, info.height = header.size
        image = open_checked(path, relaxed)
        info.width, info.height = image.size  # as displayed, after EXIF rotation
        info.decodable = True
    except ImageRejected as exc:
        info.error = exc.reason
    except (OSError, SyntaxError, ValueError) as exc:
        info.error = f"not an image ({exc.__class__.__name__})"
    return info


def load_rgb(path: str | Path) -> Image.Image:
    """An image file as 8-bit RGB the way ingestion reads it (EXIF rotation applied, alpha flattened on white,
    16-bit scaled), at any size: what augmentation and training read subject and class images with, so a folder
    that was not ingested (``customcrafter train --subject DIR``) is seen as ``data add`` would see it."""
    return normalise_image(open_checked(path, ImageLimits(min_side=1, max_aspect=1e9)), max_side=1 << 30)
