"""Training examples: augmented subject images as still clips, and class images for prior preservation.

Each training step draws the whole global batch (``per_device_batch_size`` x processes) of instance examples, each
followed by (with prior preservation) one class example, from a ``random.Random`` owned by the dataset and seeded
alike in every process (its state is checkpointed, so a resumed run draws the same examples); each process keeps its
slice of the global batch, so what is trained does not depend on how the batch is split over processes:

- instance: a subject image through :func:`customcrafter.data.augment.augment_instance` (flip, crop, zoom, mask,
  prompt prefix), repeated to ``num_frames`` identical frames; caption = a random instance template around
  ``"<prefix><token> <class word>"``;
- class: a class image through :func:`~customcrafter.data.augment.prepare_class_image`, caption ``class_prompt``.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from customcrafter.data.augment import augment_instance, prepare_class_image
from customcrafter.data.subjects import (
    SUBJECT_FILE,
    Subject,
    SubjectDataError,
    SubjectMeta,
    iter_image_files,
    load_subject,
)
from customcrafter.training.config import TrainConfig

__all__ = ["resolve_subject", "Example", "SubjectDataset"]

logger = logging.getLogger(__name__)


def resolve_subject(subject_dir: str | Path, class_word: str | None = None, token: str | None = None,
                    kind: str | None = None) -> Subject:
    """The subject to train: ``subject.yaml`` when present (fields given here override it), else the folder's images
    plus ``class_word`` (a bare image folder such as a DreamBooth subject)."""
    folder = Path(subject_dir)
    if (folder / SUBJECT_FILE).is_file():
        subject = load_subject(folder)
        updates = {k: v for k, v in {"class_word": class_word, "token": token, "kind": kind}.items() if v}
        if updates:
            meta = SubjectMeta(name=subject.name, **{"class_word": subject.class_word, "token": subject.token,
                                                     "kind": subject.kind, **updates})
            subject = replace(subject, class_word=meta.class_word, token=meta.token, kind=meta.kind)
        return subject
    if not folder.is_dir():
        raise SubjectDataError(f"{folder}: subject folder not found")
    if not class_word:
        raise SubjectDataError(f"{folder}: no {SUBJECT_FILE}; give the class word (--class-word, or class_word "
                               "in the config) to train on a bare image folder")
    name = folder.name.lower().replace(" ", "_")
    try:
        meta = SubjectMeta(name=name, class_word=class_word, token=token or "<new1>", kind=kind or "object")
    except ValueError as exc:
        raise SubjectDataError(f"{folder}: {exc}") from None
    images = iter_image_files(folder)
    if not images:
        raise SubjectDataError(f"{folder}: no images (.jpg, .png, .webp, .tif)")
    for image in images:
        if image.stat().st_size == 0:
            raise SubjectDataError(f"{image}: empty file")
    return Subject(name=meta.name, class_word=meta.class_word, token=meta.token, kind=meta.kind,
                   image_paths=images, dir=folder)


def _open_rgb(path: Path) -> Image.Image:
    from customcrafter.data.images import ImageRejected, load_rgb

    try:
        return load_rgb(path)
    except ImageRejected as exc:
        raise SubjectDataError(f"{path}: not a readable image ({exc.reason})") from None
    except (OSError, ValueError) as exc:
        raise SubjectDataError(f"{path}: not a readable image ({exc})") from None


@dataclass
class Example:
    """One clip: pixels ``(3, T, H, W)`` in [-1, 1], mask ``(1, T, H/8, W/8)``, caption.

    ``image_key``: names the clip's image when the same key always brings the same pixels (a class image, a
    materialised example), so its VAE posterior may be reused; None for an image augmented on the fly."""

    pixels: torch.Tensor
    mask: torch.Tensor
    caption: str
    image_key: tuple | None = None


def _still_clip(pixels: torch.Tensor, mask: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and mask repeated over ``num_frames`` as views (training sends only the one image to the device)."""
    return pixels.unsqueeze(1).expand(-1, num_frames, -1, -1), mask[None, None].expand(1, num_frames, -1, -1)


class SubjectDataset:
    """Draws instance and class examples; all randomness from ``self.rng`` (checkpointed)."""

    def __init__(self, subject: Subject, config: TrainConfig, class_image_paths: list[Path] | None = None):
        self.subject, self.config = subject, config
        self.rng = random.Random(config.seed)
        self.instance_images = [_open_rgb(p) for p in subject.image_paths]
        self.examples = self._read_examples_dir(Path(config.examples_dir)) if config.examples_dir else None
        self.class_image_paths = list(class_image_paths or [])
        self._class_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if config.prior_preservation and not self.class_image_paths:
            raise ValueError("prior_preservation is on but there are no class images")

    def drawn_files(self) -> dict[str, list[Path]]:
        """The files examples are drawn from besides the subject's images, by kind: class images and (examples_dir)
        the materialised examples with their manifest - what a resumed run must find unchanged."""
        files = {"class_images": list(self.class_image_paths)}
        if self.examples is not None:
            folder = Path(self.config.examples_dir)
            files["examples"] = [folder / "examples.jsonl", *(folder / record[key] for record in self.examples
                                                               for key in ("image", "mask"))]
        return files

    def _read_examples_dir(self, folder: Path) -> list[dict]:
        manifest = folder / "examples.jsonl"
        if not manifest.is_file():
            raise SubjectDataError(f"{manifest}: missing (examples_dir must be materialise_examples output)")
        records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        if not records:
            raise SubjectDataError(f"{manifest}: no examples")
        return records

    def _instance_from_examples_dir(self) -> tuple[torch.Tensor, torch.Tensor, str, str]:
        record = self.rng.choice(self.examples)
        folder = Path(self.config.examples_dir)
        image = _open_rgb(folder / record["image"])
        height, width = self.config.resolution
        if image.size != (width, height):
            raise SubjectDataError(f"{folder / record['image']}: {image.size[0]}x{image.size[1]}, but training "
                                   f"uses {width}x{height} (re-run the augment step with this resolution)")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        with Image.open(folder / record["mask"]) as mask_image:
            mask = torch.from_numpy((np.asarray(mask_image.convert("L")) > 127).astype(np.float32))
        return pixels, mask, record.get("prompt_prefix", ""), record["image"]

    def instance_example(self) -> Example:
        key = None
        if self.examples is not None:
            pixels, mask, prefix, name = self._instance_from_examples_dir()
            key = ("example", name)
        else:
            image = self.rng.choice(self.instance_images)
            augmented = augment_instance(image, self.rng, self.config.augment)
            pixels, mask, prefix = augmented.pixels, augmented.mask, augmented.prefix
        template = self.rng.choice(self.config.instance_templates)
        # the zoom prefix goes before the whole caption, as the reference code's augment() adds it
        caption = prefix + template.format(f"{self.subject.token} {self.subject.class_word}")
        caption = self._maybe_drop(caption)
        return Example(*_still_clip(pixels, mask, self.config.num_frames), caption, key)

    def class_prompt(self) -> str:
        return self.config.class_prompt.format(class_word=self.subject.class_word)

    def class_example(self) -> Example:
        index = self.rng.randrange(len(self.class_image_paths))
        if index not in self._class_cache:  # deterministic preprocessing: decode each class image once
            prepared = prepare_class_image(_open_rgb(self.class_image_paths[index]), self.config.augment)
            self._class_cache[index] = (prepared.pixels, prepared.mask)
        pixels, mask = self._class_cache[index]
        return Example(*_still_clip(pixels, mask, self.config.num_frames), self._maybe_drop(self.class_prompt()),
                       ("class", index))

    def _maybe_drop(self, caption: str) -> str:
        # Drawn every time (even at p = 0) so that the random stream does not depend on the dropout setting.
        return "" if self.rng.random() < self.config.caption_dropout else caption

    def next_batch(self) -> dict[str, Example]:
        """One global-batch element: ``{"instance": Example}`` plus ``"class"`` with prior preservation."""
        batch = {"instance": self.instance_example()}
        if self.config.prior_preservation:
            batch["class"] = self.class_example()
        return batch

    def next_global_batch(self, size: int) -> list[dict[str, Example]]:
        """``size`` elements of :meth:`next_batch`, in order (every process draws them all and keeps its slice)."""
        return [self.next_batch() for _ in range(size)]
