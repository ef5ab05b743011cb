#!/usr/bin/env python
"""Count the ATen operations of one CustomCrafter training step, per part (≈ kernel launches on a GPU).

Runs on the CPU with the full-size VideoCrafter2 architecture (random weights) at a small resolution: the number of
operations does not depend on the resolution, so this shows what an eager GPU step has to launch.

    python benchmarks/count_train_ops.py --frames 4
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import accelerate
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import customcrafter.training.trainer as trainer
from customcrafter.training.config import TrainConfig

# View-only operations launch no kernel.
VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "detach", "alias", "slice", "unsqueeze",
         "squeeze", "split", "split_with_sizes", "select", "as_strided", "reshape", "unbind"}


class Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.part = "other"
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.part][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def label(counter: Counter, owner, attribute: str, part: str) -> None:
    original = getattr(owner, attribute)

    def wrapped(*args, **kwargs):
        previous, counter.part = counter.part, part
        try:
            return original(*args, **kwargs)
        finally:
            counter.part = previous

    setattr(owner, attribute, wrapped)


def full_size_pipeline():
    """The full-size VideoCrafter2 architecture with random weights, frozen, on the CPU."""
    from diffusers import AutoencoderKL

    from customcrafter.convert import read_configs
    from customcrafter.models.text import build_text_encoder, load_tokenizer, openclip_text_config
    from customcrafter.models.unet import VideoCrafter2UNet
    from customcrafter.pipeline import VideoCrafter2Pipeline
    from customcrafter.scheduler import VideoCrafter2DDIMScheduler

    configs = read_configs()
    torch.manual_seed(0)
    unet, vae = VideoCrafter2UNet(**configs.unet), AutoencoderKL(**configs.vae)
    text_encoder = build_text_encoder(openclip_text_config(**configs.text))
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return VideoCrafter2Pipeline(vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(), unet=unet,
                                 scheduler=VideoCrafter2DDIMScheduler(**configs.scheduler))


def small_training_config(frames: int, steps: int) -> TrainConfig:
    """CustomCrafter training at 64 x 64 pixels on synthetic subject and class images (a temporary folder)."""
    from gpu import synthetic_subject  # benchmarks/gpu.py

    tmp = Path(tempfile.mkdtemp())
    return TrainConfig(base_model="random-full-size", subject_dir=str(synthetic_subject(tmp, 3, (128, 128))),
                       class_word="dog", output_dir=str(tmp / "run"), num_frames=frames, steps=steps, log_every=1,
                       checkpoint_every=None, resolution=(64, 64), gradient_checkpointing=False,
                       class_images_dir=str(synthetic_subject(tmp / "class", 3, (64, 64))), num_class_images=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=4)
    args = parser.parse_args()

    pipe = full_size_pipeline()
    counter = Counter()
    label(counter, trainer.DiffusionLoss, "encode_clip", "vae encode")
    label(counter, trainer.DiffusionLoss, "encode_text", "text encoder forward")
    label(counter, pipe.unet, "forward", "unet forward")
    label(counter, accelerate.Accelerator, "backward", "backward (unet + text)")
    label(counter, torch.optim.AdamW, "step", "optimizer")
    collate, steps = trainer._collate, [0]

    def counting_collate(*a, **k):  # count the second step only (the first builds state)
        steps[0] += 1
        if steps[0] == 2:
            counter.__enter__()
        return collate(*a, **k)

    trainer._collate = counting_collate
    trainer.train(small_training_config(args.frames, steps=2), pipe=pipe)
    counter.__exit__(None, None, None)
    print(f"ATen operations in one training step ({args.frames} frames), excluding view-only ones:")
    total = 0
    for part in ("vae encode", "text encoder forward", "unet forward", "backward (unet + text)", "optimizer"):
        launched = sum(n for name, n in counter.counts[part].items() if name not in VIEWS)
        total += launched
        top = ", ".join(f"{name} {n}" for name, n in counter.counts[part].most_common() if name not in VIEWS)
        print(f"  {part:<24} {launched:6d}   ({top[:110]})")
    print(f"  {'total':<24} {total:6d}")
    print("(the optimizer is counted on the CPU, one tensor at a time; on CUDA it is the fused AdamW kernel)")


if __name__ == "__main__":
    main()
