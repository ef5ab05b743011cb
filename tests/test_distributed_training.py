"""Multi-process training (DDP over gloo on the CPU) trains exactly what one process trains with the same global batch.

Every process draws the whole global batch and keeps its slice, and each example's posterior sample, noise and
timestep come from a generator seeded with (seed, step, global index, branch), so 2 processes x batch 1 equal
1 process x batch 2 up to float summation order - and differ from 1 process x batch 1 (which would also be what
2 processes trained if every rank saw the same example).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from customcrafter.training.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBJECT = REPO_ROOT / "data" / "subjects" / "dog"
MODULE_FILES = ("adapter_model.safetensors", "token_embeddings.safetensors")


def _fields(tmp_path: Path) -> dict:
    # adam_eps=1 (>> the gradients, ~1e-3) makes AdamW's step linear in the gradient (~ SGD with lr 1): the weights
    # then compare the layouts' gradients (which agree to ~1e-7). With the default eps, m/sqrt(v) turns float-level
    # differences in near-zero gradient entries into steps of up to ~lr: measured max |difference| ~0.1 x lr.
    return dict(base_model="tiny", subject_dir=str(SUBJECT), resolution=(64, 96), num_frames=2, steps=3, lr=1.0,
                adam_eps=1.0, prior_preservation=True, num_class_images=2, class_image_steps=2,
                class_images_cache_dir=str(tmp_path / "class_cache"), checkpoint_every=None, log_every=2,
                loss="l1", caption_dropout=0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _module(output_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in MODULE_FILES:
        tensors.update({f"{name}:{k}": v for k, v in load_file(str(output_dir / "subject_module" / name)).items()})
    return tensors


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.integration
def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(tmp_path):
    from customcrafter.training.trainer import train

    fields = _fields(tmp_path)
    config_file = tmp_path / "config.json"  # JSON is YAML: the CLI's --config reads it
    config_file.write_text(json.dumps({k: v for k, v in fields.items() if k not in ("subject_dir", "base_model")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1",
           "PYTHONUNBUFFERED": "1"}
    # --multi_gpu is accelerate's multi-process launcher (torchrun); without a visible GPU the trainer's
    # Accelerator(cpu=True) makes it DDP over gloo. (`--cpu` would start a single process.)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()),
               "-m", "customcrafter", "train", "--subject", str(SUBJECT), "--base-model", "tiny",
               "--config", str(config_file), "--output", str(tmp_path / "ddp")]
    launched = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-5000:]
    assert "global batch 2 = 1 per process x 2 process(es)" in launched.stderr
    assert "class images of 'a photo of a dog' with the base model" in launched.stderr \
        and "(2 process(es))" in launched.stderr
    ddp_losses = json.loads((tmp_path / "ddp" / "subject_module" / "losses.json").read_text())
    schedule = json.loads((tmp_path / "ddp" / "subject_module" / "module.json").read_text())["train_schedule"]
    assert (schedule["processes"], schedule["global_batch"]) == (2, 2)

    single = train(TrainConfig(**fields, per_device_batch_size=2, output_dir=str(tmp_path / "single_b2")))
    assert len(single.step_seconds) == 2 and all(s > 0 for s in single.step_seconds)  # log_every=2 over 3 steps
    # the two processes drew a share of the class images each (the runs above and below all use them): image i on
    # process i mod 2 is the image one process draws (up to the float summation order of another thread count:
    # measured at most 1 grey level), and nothing temporary is left behind
    from customcrafter.loading import load_base_pipeline
    from customcrafter.training.class_images import resolve_class_images

    (ddp_cache,) = Path(fields["class_images_cache_dir"]).iterdir()
    assert sorted(p.name for p in ddp_cache.iterdir()) == ["0000.png", "0001.png", "info.json"]
    alone = TrainConfig(**{**fields, "class_images_cache_dir": str(tmp_path / "class_cache_alone")})
    for png in resolve_class_images(alone, load_base_pipeline("tiny"), "dog"):
        ddp_image, alone_image = (np.asarray(Image.open(p), dtype=int) for p in (ddp_cache / png.name, png))
        assert png.parent.name == ddp_cache.name and np.abs(ddp_image - alone_image).max() <= 2, png.name
    difference = _max_difference(_module(tmp_path / "ddp"), _module(tmp_path / "single_b2"))
    assert difference < 1e-5, difference  # measured: 1.6e-6 (token row; LoRA 7e-7), float summation order
    assert ddp_losses == pytest.approx(single.losses, rel=1e-5)  # measured: within 2e-7

    # The same run with batch 1 trains something else (measured: 0.03 apart), so the checks above would catch ranks
    # that all trained the same example.
    batch_one = train(TrainConfig(**fields, output_dir=str(tmp_path / "single_b1")))
    assert _max_difference(_module(tmp_path / "ddp"), _module(tmp_path / "single_b1")) > 1e-3
    assert ddp_losses[1:] != pytest.approx(batch_one.losses[1:], rel=1e-3)


def test_masked_l1_is_the_mean_of_per_example_losses():
    from customcrafter.training.trainer import epsilon_loss

    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 2, 8, 12, generator=generator), torch.randn(2, 4, 2, 8, 12, generator=generator)
    mask = torch.ones(2, 1, 2, 8, 12)
    mask[1, :, :, :4] = 0  # a zoomed-out example: half its mask is off
    both = epsilon_loss(pred, target, mask, "l1")
    each = [epsilon_loss(pred[i:i + 1], target[i:i + 1], mask[i:i + 1], "l1") for i in range(2)]
    assert torch.allclose(both, (each[0] + each[1]) / 2)


def test_example_noise_depends_only_on_seed_step_index_and_branch():
    from customcrafter.training.trainer import draw_example_noise, example_seed

    def draw(*key):
        return draw_example_noise(example_seed(*key), (4, 2, 8, 12), 1000)

    first, again = draw(23, 5, 1, "instance"), draw(23, 5, 1, "instance")
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    for other in [(24, 5, 1, "instance"), (23, 6, 1, "instance"), (23, 5, 0, "instance"), (23, 5, 1, "class")]:
        assert not torch.equal(draw(*other)[2], first[2]), other


def test_example_dropout_masks_do_not_depend_on_the_batch_layout():
    from customcrafter.training.trainer import ExampleDropout, _ExampleSeeds

    seeds = _ExampleSeeds()
    dropout = ExampleDropout(0.5, index=3, seeds=seeds).train()
    x = torch.ones(2 * 3, 4, 5)  # (B·F, ...) with B = 2, F = 3
    seeds.current = [11, 12]
    both = dropout(x)
    seeds.current = [11]
    first = dropout(x[:3])
    seeds.current = [12]
    second = dropout(x[3:])
    assert torch.equal(both, torch.cat([first, second]))
    assert set(both.unique().tolist()) == {0.0, 2.0} and not torch.equal(first, second)
    assert torch.equal(dropout.eval()(x), x)


def test_static_dropout_masks_are_refilled_in_place_with_the_eager_values():
    """CUDA-graph mode: masks live in fixed buffers (a captured graph reads one address) refilled by set()."""
    from customcrafter.training.trainer import ExampleDropout, _ExampleSeeds

    eager_seeds, static_seeds = _ExampleSeeds(), _ExampleSeeds()
    static_seeds.use_static_masks(True)
    eager = ExampleDropout(0.3, index=7, seeds=eager_seeds).train()
    static = ExampleDropout(0.3, index=7, seeds=static_seeds).train()
    x = torch.randn(2 * 3, 4, 5)
    addresses = set()
    for step_seeds in ([11, 12], [13, 14], [11, 12]):
        eager_seeds.set(step_seeds)
        static_seeds.set(step_seeds)
        assert torch.equal(static(x), eager(x)), step_seeds
        buffer = static.mask
        addresses.add(buffer.data_ptr())
    assert len(addresses) == 1  # refilled, never reallocated
    with pytest.raises(RuntimeError, match="batch layout changed"):
        static_seeds.set([1, 2, 3, 4])


def test_encode_video_with_given_noise_is_the_posterior_sample():
    from customcrafter.loading import load_base_pipeline
    from customcrafter.models.vae import encode_video

    vae = load_base_pipeline("tiny").vae
    video = torch.rand(2, 3, 2, 16, 24) * 2 - 1
    noise = torch.randn(2, 4, 2, 2, 3)
    with torch.no_grad():
        mean = encode_video(vae, video, sample=False)
        sampled = encode_video(vae, video, noise=noise)
        zero = encode_video(vae, video, noise=torch.zeros_like(noise), chunk_size=4)
        std = vae.encode(video[0].permute(1, 0, 2, 3)).latent_dist.std  # frames of the first clip
    assert torch.allclose(zero, mean, atol=1e-6)
    expected = (std * noise[0].permute(1, 0, 2, 3)).permute(1, 0, 2, 3) * vae.config.scaling_factor
    assert torch.allclose(sampled[0] - mean[0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="sample=True"):
        encode_video(vae, video, sample=False, noise=noise)
