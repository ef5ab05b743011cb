"""Class images for prior preservation: a user folder, or generated once with the base model and cached.

The reference code's README retrieves 200 real images from LAION or samples SD-2.1-base; with neither available
offline, we sample the base model itself (single frames) with the class prompt. The cache key covers everything
that changes the images (the base model - its architecture and its weights -, prompt, count, resolution, steps,
seed), so a cache entry is never reused for a different request; entries are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from customcrafter.data.subjects import iter_image_files
from customcrafter.utils import atomic_dir

__all__ = ["class_images_cache_key", "class_images_model_id", "default_cache_root", "generate_class_images",
           "resolve_class_images"]

logger = logging.getLogger(__name__)


def default_cache_root() -> Path:
    from customcrafter.loading import default_cache_dir

    return default_cache_dir() / "class_images"


@torch.no_grad()
def class_images_model_id(pipe) -> str:
    """Which base model draws the class images: ``base_model_signature`` (the configs, i.e. the architecture: the
    same for VideoCrafter1 and 2, or a fine-tune) and a digest of the weights of the UNet, text encoder and VAE - a
    strided sample of up to 64 values of every tensor (a fine-tune moves them all), copied to the host once per
    component."""
    from customcrafter.loading import base_model_signature

    samples = []
    for component in (pipe.unet, pipe.text_encoder, pipe.vae):
        strided = [tensor.detach().reshape(-1)[:: max(1, tensor.numel() // 64)][:64].float()
                   for _, tensor in sorted(component.state_dict().items())]
        samples.append(torch.cat(strided).cpu())
    weights = hashlib.sha256(torch.cat(samples).numpy().tobytes()).hexdigest()[:16]
    return f"{base_model_signature(pipe)}-{weights}"


def class_images_cache_key(model_id: str, prompt: str, count: int, resolution: tuple[int, int], steps: int,
                           seed: int) -> str:
    """``model_id``: :func:`class_images_model_id` of the pipeline that draws them."""
    payload = json.dumps({"model": model_id, "prompt": prompt, "count": count, "resolution": list(resolution),
                          "steps": steps, "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class _OneProcess:
    """What :func:`generate_class_images` asks of a process group (an ``accelerate.Accelerator`` has the same), for a
    caller that is alone."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


@torch.no_grad()
def generate_class_images(pipe, prompt: str, count: int, out_dir: Path, resolution: tuple[int, int], steps: int,
                          seed: int = 0, processes=None) -> list[Path]:
    """Sample ``count`` single-frame images of ``prompt`` into ``out_dir`` (atomically); image i uses seed+i.

    ``processes`` (an ``accelerate.Accelerator``; default: this process alone): every process of a training run
    calls this and draws its share, image i on process i mod N, into one temporary folder that the main process
    then renames - N GPUs take 1/N of the time, and none waits long in a collective. A folder already there (an
    incomplete set) is replaced; one that another job writes meanwhile is kept: a training run may already be
    reading it.
    """
    processes = processes or _OneProcess()
    if processes.is_main_process:
        try:
            with atomic_dir(out_dir, overwrite=out_dir.exists()) as tmp:
                _draw_share(pipe, prompt, count, _shared_folder(processes, tmp), resolution, steps, seed, processes)
                processes.wait_for_everyone()  # every share written
                (tmp / "info.json").write_text(json.dumps({"prompt": prompt, "count": count, "steps": steps,
                                                           "resolution": list(resolution), "seed": seed}, indent=2))
        except FileExistsError:  # another job (pods sharing the cache volume) wrote the same set first
            logger.info("another process generated the class images meanwhile; using %s", out_dir)
    else:
        _draw_share(pipe, prompt, count, _shared_folder(processes, None), resolution, steps, seed, processes)
        processes.wait_for_everyone()
    processes.wait_for_everyone()  # the set is in place
    return iter_image_files(out_dir)


def _main_process_says(processes, value):
    """The main process's ``value`` on every process (a folder seen complete by some processes and not by others
    would send them down different paths, into different collectives)."""
    if processes is None or processes.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _shared_folder(processes, folder: Path | None) -> Path:
    """The main process's temporary folder, sent to every process."""
    return Path(_main_process_says(processes, str(folder) if folder else None))


def _draw_share(pipe, prompt: str, count: int, folder: Path, resolution: tuple[int, int], steps: int, seed: int,
                processes) -> None:
    height, width = resolution
    share = range(processes.process_index, count, processes.num_processes)
    for index in tqdm(share, desc="class images", disable=len(share) < 4 or not processes.is_main_process):
        generator = torch.Generator(device="cpu").manual_seed(seed + index)
        frames = pipe(prompt, num_inference_steps=steps, num_frames=1, height=height, width=width,
                      generator=generator, output_type="np", progress=False).frames
        Image.fromarray(frames[0][0]).save(folder / f"{index:04d}.png")


def _check_readable(paths: list[Path]) -> None:
    """Every class image decodes (``data.images.open_checked`` with no size or shape limits: any size is cropped)."""
    from customcrafter.data.images import ImageLimits, ImageRejected, open_checked
    from customcrafter.data.subjects import SubjectDataError

    any_size = ImageLimits(min_side=1, max_aspect=1e9)
    for path in paths:
        try:
            open_checked(path, any_size).close()
        except ImageRejected as exc:
            raise SubjectDataError(f"class image {path}: not a readable image ({exc.reason})") from None


def resolve_class_images(config, pipe, class_word: str, processes=None) -> list[Path]:
    """The class images of a training run: ``config.class_images_dir`` or the cached generated set (generated by
    every process of ``processes``, see :func:`generate_class_images`)."""
    if config.class_images_dir:
        folder = Path(config.class_images_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"class_images_dir {folder}: not a folder")
        images = iter_image_files(folder)
        if not images:
            raise ValueError(f"class_images_dir {folder}: no images")
        if len(images) < config.num_class_images:
            logger.info("class_images_dir %s holds %d images (< num_class_images %d): using all of them",
                        folder, len(images), config.num_class_images)
        images = images[: config.num_class_images]
        _check_readable(images)  # before training starts, not at the step that first draws a broken one
        return images

    prompt = config.class_prompt.format(class_word=class_word)
    key = class_images_cache_key(class_images_model_id(pipe), prompt, config.num_class_images,
                                 tuple(config.resolution), config.class_image_steps, config.seed)
    root = Path(config.class_images_cache_dir) if config.class_images_cache_dir else default_cache_root()
    folder = root / key
    images = iter_image_files(folder) if folder.is_dir() else []
    if _main_process_says(processes, len(images) >= config.num_class_images):  # one decision for all processes
        logger.info("using %d cached class images from %s", len(images), folder)
        return images[: config.num_class_images]
    logger.info("generating %d class images of %r with the base model into %s (%d process(es))",
                config.num_class_images, prompt, folder, processes.num_processes if processes else 1)
    images = generate_class_images(pipe, prompt, config.num_class_images, folder, tuple(config.resolution),
                                   config.class_image_steps, config.seed, processes)
    if len(images) < config.num_class_images:
        raise RuntimeError(f"class images: {folder} holds {len(images)} images, {config.num_class_images} expected")
    return images[: config.num_class_images]
