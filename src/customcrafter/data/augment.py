"""Seeded instance-image augmentation of CustomCrafter (as in its reference code), and the step that materialises it.

Per training sample (``customcrafter-reference.md``, "Data and augmentation"):

1. RGB, random horizontal flip (p 0.5), centre-crop to the target aspect (W/H = 1.6) and bicubic resize to 512x320.
2. A zoom factor: with p 2/3 one of {0.3, ..., 1.0}, with p 1/3 one of {1.2, 1.3, 1.4}.
   - 0.3-0.5 (*zoom out*): shrink, paste at a random place on a black canvas; the loss mask is the pasted box in
     latent cells; the caption gets the prefix "a far away " or "very small ".
   - 1.2-1.4 (*zoom in*): upscale and take a random 320x512 crop; prefix "zoomed in " or "close up "; mask all ones.
   - 0.6-1.0: unchanged, no prefix, mask all ones.

Everything random is drawn from the ``random.Random`` passed in, in a fixed order, so the same seed gives the same
examples on every machine. The training dataset calls :func:`augment_instance`; the pipeline's inspection step calls
:func:`materialise_examples`.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator

from customcrafter.config import StrictModel
from customcrafter.data.images import load_rgb
from customcrafter.utils import atomic_dir

logger = logging.getLogger(__name__)

__all__ = [
    "AugmentConfig",
    "AugmentedExample",
    "augment_instance",
    "prepare_class_image",
    "materialise_examples",
    "LATENT_FACTOR",
    "PAPER_ZOOM_OUT_FACTORS",
]

#: The VAE downsamples by 8: one mask cell per 8x8 pixels.
LATENT_FACTOR = 8
#: The reference code's zoom-out factors.
REFERENCE_ZOOM_OUT_FACTORS = (0.3, 0.4, 0.5)
#: The paper's text gives the zoom range as 0.4-1.4, i.e. no 0.3 zoom-out.
PAPER_ZOOM_OUT_FACTORS = (0.4, 0.5)


class AugmentConfig(StrictModel):
    """Instance augmentation. Defaults reproduce the reference code; ``zoom_range="paper"`` the paper's text."""

    resolution: tuple[int, int] = Field((320, 512), description="(H, W) of the training frames; multiples of 8")
    flip_p: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")
    enabled: bool = Field(True, description="apply the zoom augmentation; False = flip + crop/resize only "
                                            "(the flip is governed by flip_p alone, as in Custom Diffusion)")
    zoom_range: Literal["reference", "paper"] = Field(
        "reference", description="'reference': zoom-out factors 0.3-0.5 (the reference code); 'paper': 0.4-0.5 "
                                 "(the paper's text says 0.4-1.4). Only applies while zoom_out_factors is left at "
                                 "its default.")
    zoom_in_p: float = Field(1 / 3, ge=0.0, le=1.0, description="probability of drawing from zoom_in_factors "
                                                                 "(else from zoom_out + zoom_keep factors)")
    zoom_out_factors: tuple[float, ...] = Field(REFERENCE_ZOOM_OUT_FACTORS, description="shrink-and-paste factors")
    zoom_keep_factors: tuple[float, ...] = Field((0.6, 0.7, 0.8, 0.9, 1.0), description="factors that leave the "
                                                                                       "image unchanged")
    zoom_in_factors: tuple[float, ...] = Field((1.2, 1.3, 1.4), description="upscale-and-crop factors")
    zoom_out_prefixes: tuple[str, ...] = ("a far away ", "very small ")
    zoom_in_prefixes: tuple[str, ...] = ("zoomed in ", "close up ")

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        height, width = self.resolution
        if height <= 0 or width <= 0 or height % LATENT_FACTOR or width % LATENT_FACTOR:
            raise ValueError(f"resolution {self.resolution}: both sides must be positive multiples of {LATENT_FACTOR}")
        if any(not 0 < f < 1 for f in self.zoom_out_factors):
            raise ValueError(f"zoom_out_factors {self.zoom_out_factors}: each must be in (0, 1)")
        if any(f <= 1 for f in self.zoom_in_factors):
            raise ValueError(f"zoom_in_factors {self.zoom_in_factors}: each must be > 1")
        if not self.zoom_out_factors + self.zoom_keep_factors and self.zoom_in_p < 1:
            raise ValueError("zoom_out_factors and zoom_keep_factors are both empty but zoom_in_p < 1")
        if not self.zoom_in_factors and self.zoom_in_p > 0:
            raise ValueError("zoom_in_factors is empty but zoom_in_p > 0")
        if self.zoom_range == "paper" and self.zoom_out_factors == REFERENCE_ZOOM_OUT_FACTORS:
            # Written through __dict__: a plain assignment would re-run this validator (validate_assignment).
            self.__dict__["zoom_out_factors"] = PAPER_ZOOM_OUT_FACTORS
        return self


@dataclass
class AugmentedExample:
    """One augmented training image.

    pixels: ``(3, H, W)`` float32 in [-1, 1]. mask: ``(H // 8, W // 8)`` float32 of {0, 1}, one value per latent
    cell (1 = the loss counts there). prefix: caption prefix ("" when none). zoom: the factor drawn (1.0 = none).
    """

    pixels: torch.Tensor
    mask: torch.Tensor
    prefix: str
    zoom: float


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def _centre_crop_to_aspect(image: Image.Image, aspect: float) -> Image.Image:
    """Largest centred crop with width / height == aspect."""
    width, height = image.size
    if width / height > aspect:
        new_width = max(1, round(height * aspect))
        left = (width - new_width) // 2
        return image.crop((left, 0, left + new_width, height))
    new_height = max(1, round(width / aspect))
    top = (height - new_height) // 2
    return image.crop((0, top, width, top + new_height))


def _draw_zoom(rng: random.Random, config: AugmentConfig) -> float:
    if not config.enabled:
        return 1.0
    if rng.random() < config.zoom_in_p:
        return rng.choice(config.zoom_in_factors)
    return rng.choice(config.zoom_out_factors + config.zoom_keep_factors)


def augment_instance(image: Image.Image, rng: random.Random, config: AugmentConfig | None = None) -> AugmentedExample:
    """Flip, crop/resize and zoom one instance image; see the module docstring. Deterministic given ``rng``'s state."""
    config = config or AugmentConfig()
    height, width = config.resolution
    image = image.convert("RGB")
    if rng.random() < config.flip_p:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = _centre_crop_to_aspect(image, width / height).resize((width, height), Image.Resampling.BICUBIC)
    zoom = _draw_zoom(rng, config)
    mask = torch.ones(height // LATENT_FACTOR, width // LATENT_FACTOR)
    prefix = ""

    if zoom in config.zoom_out_factors:
        prefix = rng.choice(config.zoom_out_prefixes) if config.zoom_out_prefixes else ""
        small_w, small_h = max(1, round(width * zoom)), max(1, round(height * zoom))
        small = image.resize((small_w, small_h), Image.Resampling.BICUBIC)
        left, top = rng.randint(0, width - small_w), rng.randint(0, height - small_h)
        canvas = Image.new("RGB", (width, height), (0, 0, 0))
        canvas.paste(small, (left, top))
        image = canvas
        # Loss only on latent cells that lie wholly inside the pasted box: the cells on its border mix content
        # and black canvas (Custom Diffusion shrinks its mask inwards for the same reason).
        mask.zero_()
        row0, col0 = math.ceil(top / LATENT_FACTOR), math.ceil(left / LATENT_FACTOR)
        row1, col1 = (top + small_h) // LATENT_FACTOR, (left + small_w) // LATENT_FACTOR
        mask[row0:row1, col0:col1] = 1.0
    elif zoom in config.zoom_in_factors:
        prefix = rng.choice(config.zoom_in_prefixes) if config.zoom_in_prefixes else ""
        big_w, big_h = round(width * zoom), round(height * zoom)
        big = image.resize((big_w, big_h), Image.Resampling.BICUBIC)
        left, top = rng.randint(0, big_w - width), rng.randint(0, big_h - height)
        image = big.crop((left, top, left + width, top + height))
    # else: a "keep" factor (0.6-1.0) leaves the image as it is, as in the reference code.

    return AugmentedExample(pixels=_to_tensor(image), mask=mask, prefix=prefix, zoom=float(zoom))


def prepare_class_image(image: Image.Image, config: AugmentConfig | None = None) -> AugmentedExample:
    """A prior-preservation image: squashed (not cropped) to the resolution, no flip or zoom, mask all ones."""
    config = config or AugmentConfig()
    height, width = config.resolution
    image = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    mask = torch.ones(height // LATENT_FACTOR, width // LATENT_FACTOR)
    return AugmentedExample(pixels=_to_tensor(image), mask=mask, prefix="", zoom=1.0)


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    array = ((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _mask_to_pil(mask: torch.Tensor) -> Image.Image:
    return Image.fromarray((mask.numpy() * 255).astype(np.uint8), mode="L")


def _preview_grid(tiles: list[Image.Image], masks: list[torch.Tensor], captions: list[str],
                  columns: int = 4, tile_width: int = 256) -> Image.Image:
    """Tiles with the masked-out area dimmed in red, so the loss region is visible at a glance."""
    from PIL import ImageDraw

    tile_height = round(tile_width * tiles[0].height / tiles[0].width)
    label = 14
    rows = math.ceil(len(tiles) / columns)
    grid = Image.new("RGB", (columns * tile_width, rows * (tile_height + label)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for index, (tile, mask, caption) in enumerate(zip(tiles, masks, captions, strict=True)):
        tile = tile.resize((tile_width, tile_height), Image.Resampling.BILINEAR)
        outside = _mask_to_pil(1.0 - mask).resize(tile.size, Image.Resampling.NEAREST).point(lambda v: v // 2)
        tile = Image.composite(Image.new("RGB", tile.size, (200, 0, 0)), tile, outside)
        x, y = (index % columns) * tile_width, (index // columns) * (tile_height + label)
        grid.paste(tile, (x, y + label))
        draw.text((x + 2, y + 1), caption[:40], fill=(0, 0, 0))
    return grid


def _check_replaceable(out_dir: Path, subject_dir: Path) -> None:
    """The output folder is replaced whole: refuse one that holds the subject, one inside the data folder (or the
    subject), or anything but earlier examples."""
    out, subject = out_dir.resolve(), subject_dir.resolve()
    if out == subject or out in subject.parents:
        raise ValueError(f"{out_dir}: the output folder holds the subject {subject_dir}, and it is replaced whole; "
                         "write the examples elsewhere")
    # <data_root>/subjects/<name>: nothing generated belongs in the (DVC-versioned) data folder, nor in a subject
    data_root = subject.parent.parent if subject.parent.name == "subjects" else subject
    if data_root in out.parents:
        raise ValueError(f"{out_dir}: inside the data folder {data_root}, where it would be taken for data (versioned, "
                         "listed, validated); write the examples elsewhere, e.g. outputs/aug/<subject>")
    if out.is_file():
        raise FileExistsError(f"{out_dir}: a file, not an examples folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "examples.jsonl").is_file():
        raise FileExistsError(f"{out_dir}: not empty and not an examples folder (no examples.jsonl); it would be "
                              "replaced whole: pick an empty or new folder")


def materialise_examples(subject_dir: str | Path, out_dir: str | Path, num_examples: int = 16, seed: int = 0,
                         config: AugmentConfig | None = None) -> Path:
    """Write ``num_examples`` augmented examples of a subject to ``out_dir`` (atomically) and return it.

    Files: ``images/NNNN.png`` (the augmented frame), ``masks/NNNN.png`` (the loss mask, one pixel per latent cell,
    255 = counted), ``examples.jsonl`` (one record per example: image, mask, prompt_prefix, prompt, zoom,
    source_image) and ``preview.png`` (a grid with the masked-out area tinted). Source images are used in turn
    (example i uses image i mod n); all randomness comes from ``seed``.
    """
    from customcrafter.data.subjects import load_subject

    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    config = config or AugmentConfig()
    subject = load_subject(subject_dir)
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    _check_replaceable(out_dir, Path(subject_dir))
    tiles, masks, captions = [], [], []
    with atomic_dir(out_dir, overwrite=True) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        records = []
        sources = {}
        for index in range(num_examples):
            source = subject.image_paths[index % len(subject.image_paths)]
            if source not in sources:
                sources[source] = load_rgb(source)  # as ingestion reads it: EXIF rotation, alpha, 16-bit
            example = augment_instance(sources[source], rng, config)
            image = _to_pil(example.pixels)
            image.save(tmp / "images" / f"{index:04d}.png")
            _mask_to_pil(example.mask).save(tmp / "masks" / f"{index:04d}.png")
            prompt = f"{example.prefix}{subject.token} {subject.class_word}"
            records.append({"image": f"images/{index:04d}.png", "mask": f"masks/{index:04d}.png",
                            "prompt_prefix": example.prefix, "prompt": prompt, "zoom": example.zoom,
                            "source_image": source.name, "subject": subject.name, "seed": seed})
            tiles.append(image)
            masks.append(example.mask)
            captions.append(f"x{example.zoom:g} {example.prefix.strip()}")
        (tmp / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (tmp / "augment_config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2))
        _preview_grid(tiles, masks, captions).save(tmp / "preview.png")
    logger.info("wrote %d augmented examples of %s to %s", num_examples, subject.name, out_dir)
    return out_dir
