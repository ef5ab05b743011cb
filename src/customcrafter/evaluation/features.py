"""CLIP and DINO feature extractors, loaded through transformers from a hub id or a local folder.

The preprocessing of the reference evaluation scripts is written here in PIL + torch (no torchvision):

- CLIP: resize the short side to the model's input size (224 for ViT-B/32) with bicubic resampling, centre crop,
  scale to [0, 1], normalise with CLIP's mean/std.
- DINO: squash to the input size (224) with bilinear resampling (torchvision ``Resize((224, 224))``'s default), or
  DreamVideo's variant: short side to 256/224 of the input size, centre crop; ImageNet mean/std.

Every feature is L2-normalised, so cosine similarity is a dot product.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

__all__ = ["CLIPFeatures", "DINOFeatures", "clip_preprocess", "dino_preprocess", "to_pixel_tensor"]

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Image.Image | np.ndarray


def _as_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def _resize_short_side(image: Image.Image, size: int, resample: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new_size, resample=resample)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_pixel_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB image → normalised float tensor ``(3, H, W)``."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (array - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def clip_preprocess(image: ImageLike, size: int = 224) -> torch.Tensor:
    """CLIP's preprocessing: bicubic resize of the short side, centre crop, CLIP normalisation → ``(3, size, size)``."""
    pil = _center_crop(_resize_short_side(_as_pil(image), size, Image.BICUBIC), size)
    return to_pixel_tensor(pil, CLIP_MEAN, CLIP_STD)


def dino_preprocess(
    image: ImageLike, size: int = 224, mode: Literal["squash", "resize_crop"] = "squash"
) -> torch.Tensor:
    """DINO-I preprocessing → ``(3, size, size)`` with ImageNet normalisation (see module docstring)."""
    pil = _as_pil(image)
    if mode == "squash":
        pil = pil.resize((size, size), resample=Image.BILINEAR)
    elif mode == "resize_crop":
        pil = _center_crop(_resize_short_side(pil, round(size * 256 / 224), Image.BILINEAR), size)
    else:
        raise ValueError(f"dino_preprocess must be 'squash' or 'resize_crop', got {mode!r}")
    return to_pixel_tensor(pil, IMAGENET_MEAN, IMAGENET_STD)


def _features_tensor(output) -> torch.Tensor:
    """`get_*_features` returns a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _load_error(kind: str, model_id: str, exc: Exception) -> ValueError:
    return ValueError(
        f"cannot load the {kind} model {model_id!r} (a hub id, available offline in the cache, or a "
        f"local folder saved with save_pretrained): {exc}"
    )


class CLIPFeatures:
    """CLIP image and text features (``CLIPModel`` + ``CLIPTokenizer``), L2-normalised, batched, in eval mode."""

    def __init__(self, model_id: str, device: torch.device | str = "cpu", batch_size: int = 32):
        from transformers import CLIPModel, CLIPTokenizer

        try:
            self.model = CLIPModel.from_pretrained(model_id).eval().to(device)
            self.tokenizer = CLIPTokenizer.from_pretrained(model_id)
        except (OSError, ValueError) as exc:
            raise _load_error("CLIP", model_id, exc) from exc
        self.model_id, self.device, self.batch_size = model_id, torch.device(device), batch_size
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def image_features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """``(N, D)`` float32 on CPU."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack(
                [clip_preprocess(im, self.image_size) for im in images[start : start + self.batch_size]]
            )
            features = _features_tensor(self.model.get_image_features(pixel_values=pixels.to(self.device)))
            chunks.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return torch.cat(chunks)

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` float32 on CPU; texts longer than the context (77 tokens) are truncated."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            features = _features_tensor(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                )
            )
            chunks.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return torch.cat(chunks)


class DINOFeatures:
    """DINO ViT CLS features: ``last_hidden_state[:, 0]`` (after the final layer norm), L2-normalised."""

    def __init__(
        self,
        model_id: str,
        device: torch.device | str = "cpu",
        batch_size: int = 32,
        preprocess: Literal["squash", "resize_crop"] = "squash",
    ):
        from transformers import ViTModel

        try:
            self.model = ViTModel.from_pretrained(model_id, add_pooling_layer=False).eval().to(device)
        except (OSError, ValueError) as exc:
            raise _load_error("DINO", model_id, exc) from exc
        self.model_id, self.device, self.batch_size, self.preprocess = (
            model_id,
            torch.device(device),
            batch_size,
            preprocess,
        )
        self.image_size = int(self.model.config.image_size)

    @torch.inference_mode()
    def image_features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """``(N, D)`` float32 on CPU."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack(
                [
                    dino_preprocess(im, self.image_size, self.preprocess)
                    for im in images[start : start + self.batch_size]
                ]
            )
            cls = self.model(pixel_values=pixels.to(self.device)).last_hidden_state[:, 0]
            chunks.append(torch.nn.functional.normalize(cls.float(), dim=-1).cpu())
        return torch.cat(chunks)
