"""The training loop on the tiny base model: loss falls, only adapter + token row move, resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from customcrafter.training.config import TrainConfig


def _config(tmp_path: Path, dreambooth_dir: Path, **fields) -> TrainConfig:
    values = dict(base_model="tiny", subject_dir=str(dreambooth_dir / "dog"), class_word="dog",
                  output_dir=str(tmp_path / "run"), resolution=(64, 96), num_frames=2, steps=6,
                  prior_preservation=True, num_class_images=2, class_image_steps=2,
                  class_images_cache_dir=str(tmp_path / "class_cache"), checkpoint_every=None, lr=1e-3,
                  log_every=2)
    values.update(fields)
    return TrainConfig(**values)


def test_only_lora_and_the_token_row_change(tmp_path, dreambooth_dir):
    from customcrafter.loading import load_base_pipeline
    from customcrafter.training.trainer import train

    pipe = load_base_pipeline("tiny")
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    vae_before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    result = train(_config(tmp_path, dreambooth_dir, steps=4), pipe=pipe)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))

    unet_after = pipe.unet.state_dict()
    lora = [k for k in unet_after if ".lora_" in k]
    assert lora and all(".attentions." in k and "temp_attentions" not in k for k in lora)
    assert any(not torch.equal(unet_after[k], torch.zeros_like(unet_after[k])) for k in lora if "lora_B" in k)
    base_keys = {k.replace(".base_layer", "") for k in unet_after if ".lora_" not in k}
    assert base_keys == set(unet_before)
    for key, value in unet_after.items():
        if ".lora_" not in key:
            assert torch.equal(value, unet_before[key.replace(".base_layer", "")]), key
    for key, value in pipe.vae.state_dict().items():
        assert torch.equal(value, vae_before[key]), key
    table_key = next(k for k in text_before if k.endswith("embeddings.token_embedding.weight"))
    for key, value in pipe.text_encoder.state_dict().items():
        if key != table_key:
            assert torch.equal(value, text_before[key]), key
    table, old = pipe.text_encoder.state_dict()[table_key], text_before[table_key]
    assert torch.equal(table[: old.shape[0]], old)  # every existing row bit-identical
    assert not torch.equal(table[-1], old[pipe.tokenizer.get_vocab()["dog"]])  # the new row learned

    saved = load_file(str(result.module_dir / "token_embeddings.safetensors"))["<new1>"]
    assert torch.equal(saved, table[-1].float())
    assert json.loads((result.module_dir / "losses.json").read_text()) == result.losses


def test_the_losses_are_always_the_modules_own(tmp_path, dreambooth_dir, monkeypatch):
    """losses.json was written beside the module folder after it: a run killed between the two left its new module
    beside the previous run's losses. They are now written in the module's one atomic folder write."""
    import customcrafter.subject_module as subject_module
    from customcrafter.training.trainer import train

    first = train(_config(tmp_path, dreambooth_dir, steps=4, prior_preservation=False))
    real_save = subject_module.save_subject_module

    def killed_once_the_module_is_written(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(subject_module, "save_subject_module", killed_once_the_module_is_written)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, dreambooth_dir, steps=2, prior_preservation=False, overwrite=True))
    module = first.module_dir
    steps = json.loads((module / "module.json").read_text())["train_config"]["steps"]
    assert steps == 2 and len(json.loads((module / "losses.json").read_text())) == 2
    assert not (tmp_path / "run" / "losses.json").exists()  # no other run's losses beside the module


def _fixed_denoising_loss(pipe, images: list[Path], caption: str, size: tuple[int, int]) -> float:
    """ε-loss of the subject images at fixed timesteps and fixed noise: no sampling noise between evaluations."""
    import random

    from PIL import Image

    from customcrafter.data.augment import AugmentConfig, augment_instance
    from customcrafter.models.text import encode_prompt
    from customcrafter.models.vae import encode_video

    plain = AugmentConfig(resolution=size, enabled=False, flip_p=0.0)  # the training frames, un-augmented
    pixels = [augment_instance(Image.open(p), random.Random(0), plain).pixels for p in images]
    video = torch.stack(pixels).unsqueeze(2)  # (N, 3, 1, H, W)
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad():
        latents = encode_video(pipe.vae, video, sample=False)
        text = encode_prompt(pipe.tokenizer, pipe.text_encoder, [caption] * len(images))
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.full((len(images),), t)
            noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
            pred = pipe.unet(noisy, timesteps, encoder_hidden_states=text, fps=torch.full((len(images),), 16)).sample
            total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / 5


def test_training_lowers_the_denoising_loss_on_the_subject(tmp_path, dreambooth_dir):
    """Tiny model, tiny frames: a few dozen steps lower the loss on the subject's own images (fixed t and noise)."""
    from customcrafter.loading import load_base_pipeline
    from customcrafter.subject_module import load_subject_module
    from customcrafter.training.trainer import train

    size = (32, 48)
    config = _config(tmp_path, dreambooth_dir, steps=60, lr=1e-2, prior_preservation=False, resolution=size,
                     num_frames=1, log_every=10, augment={"enabled": False, "flip_p": 0.0})
    result = train(config)
    images = sorted((dreambooth_dir / "dog").glob("*.jpg"))
    before = _fixed_denoising_loss(load_base_pipeline("tiny"), images, "<new1> dog", size)
    trained = load_base_pipeline("tiny")
    load_subject_module(trained, result.module_dir)
    after = _fixed_denoising_loss(trained, images, "<new1> dog", size)
    assert after < 0.92 * before, (before, after)  # measured: 1.115 -> 0.932


@pytest.mark.slow
def test_loss_falls_over_a_few_hundred_steps(tmp_path, dreambooth_dir):
    from customcrafter.training.trainer import train

    losses = train(_config(tmp_path, dreambooth_dir, steps=300, lr=1e-3, resolution=(64, 96),
                           log_every=50)).losses
    assert sum(losses[-50:]) / 50 < 0.7 * sum(losses[:50]) / 50


def test_resume_after_a_kill_reproduces_the_uninterrupted_weights(tmp_path, dreambooth_dir, monkeypatch):
    from customcrafter.training import dataset as dataset_module
    from customcrafter.training.trainer import train

    straight = train(_config(tmp_path / "a", dreambooth_dir, steps=6, checkpoint_every=3))

    calls = {"n": 0}
    original = dataset_module.SubjectDataset.next_batch

    def dies_at_step_5(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return original(self)

    config = _config(tmp_path / "b", dreambooth_dir, steps=6, checkpoint_every=3)
    monkeypatch.setattr(dataset_module.SubjectDataset, "next_batch", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    assert (tmp_path / "b" / "run" / "checkpoints" / "step-3").is_dir()
    assert not (tmp_path / "b" / "run" / "subject_module").exists()  # nothing half-written
    monkeypatch.setattr(dataset_module.SubjectDataset, "next_batch", original)
    resumed = train(config)

    assert resumed.losses == straight.losses
    for name in ("adapter_model.safetensors", "token_embeddings.safetensors"):
        a, b = load_file(str(straight.module_dir / name)), load_file(str(resumed.module_dir / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_bad_subject_folder_is_a_clear_error(tmp_path, dreambooth_dir):
    from customcrafter.data.subjects import SubjectDataError
    from customcrafter.training.trainer import train

    bad = tmp_path / "mydog"
    bad.mkdir()
    (bad / "subject.yaml").write_text("name: other\nclass_word: dog\n")
    with pytest.raises(SubjectDataError, match="differs from the folder name"):
        train(_config(tmp_path, dreambooth_dir, subject_dir=str(bad)))
    assert not (tmp_path / "run").exists()


def test_cached_image_moments_train_the_same_without_re_encoding(tmp_path, dreambooth_dir):
    """Trained from materialised examples (as the pipeline does), every image has a key: with the VAE posteriors
    cached, the VAE stops encoding once each image has been seen, and training gives the same losses and weights
    as encoding every image every step."""
    import shutil

    from customcrafter.data.augment import AugmentConfig, materialise_examples
    from customcrafter.loading import load_base_pipeline
    from customcrafter.training.trainer import train

    subject = tmp_path / "dog"
    shutil.copytree(dreambooth_dir / "dog", subject, ignore=shutil.ignore_patterns("*.yaml", "*.md", "*.txt"))
    (subject / "subject.yaml").write_text("name: dog\nclass_word: dog\n")
    examples = materialise_examples(subject, tmp_path / "examples", num_examples=2,
                                    config=AugmentConfig(resolution=(64, 96)))

    def run(name: str, cache: bool):
        pipe = load_base_pipeline("tiny")
        encoded = []
        encode = pipe.vae.encode
        pipe.vae.encode = lambda x, *a, **k: (encoded.append(x.shape[0]), encode(x, *a, **k))[1]
        config = _config(tmp_path / name, dreambooth_dir, subject_dir=str(subject), examples_dir=str(examples),
                         steps=8, cache_image_moments=cache)
        return train(config, pipe=pipe), encoded

    cached, cached_encodes = run("cached", True)
    plain, plain_encodes = run("plain", False)
    assert plain_encodes[-8:] == [2] * 8  # instance + class image, every step
    # 2 examples + 2 class images: at most 4 single-image encodes in training, then none
    assert cached_encodes[-8:] != [2] * 8 and sum(n for n in cached_encodes if n == 1) <= 4
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)
    # batch-1 and batch-2 convolutions round differently (~1e-7), and AdamW's early steps (about lr x sign(grad))
    # amplify that in single elements of the small, zero-initialised LoRA: compare whole tensors
    for name in ("adapter_model.safetensors", "token_embeddings.safetensors"):
        a, b = load_file(str(cached.module_dir / name)), load_file(str(plain.module_dir / name))
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key] - b[key]).norm() <= 1e-3 * b[key].norm(), key


def test_cudnn_benchmark_is_cuda_only_and_leaves_the_process_flag(tmp_path, dreambooth_dir, monkeypatch):
    from customcrafter.training.trainer import train

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    result = train(_config(tmp_path, dreambooth_dir, steps=2, cudnn_benchmark=True))
    assert len(result.losses) == 2 and torch.backends.cudnn.benchmark is False


# --- a run resumes only its own checkpoints --------------------------------------------------------------------------
def _kill_at_step(monkeypatch, config: TrainConfig, step: int) -> None:
    """Train ``config`` and die in step ``step`` (1-based; one instance draw per step at batch 1)."""
    from customcrafter.training import dataset as dataset_module
    from customcrafter.training.trainer import train

    calls, original = {"n": 0}, dataset_module.SubjectDataset.next_batch

    def dies(self):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt("killed")
        return original(self)

    monkeypatch.setattr(dataset_module.SubjectDataset, "next_batch", dies)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(dataset_module.SubjectDataset, "next_batch", original)


def _weights(result) -> dict[str, torch.Tensor]:
    return {f"{name}:{k}": v for name in ("adapter_model.safetensors", "token_embeddings.safetensors")
            for k, v in load_file(str(result.module_dir / name)).items()}


def _same_run(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return a.losses == b.losses and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _bowl(tmp_path: Path, dreambooth_dir: Path, **fields) -> TrainConfig:
    return _config(tmp_path, dreambooth_dir, subject_dir=str(dreambooth_dir / "berry_bowl"), class_word="bowl",
                   **fields)


def test_a_finished_run_leaves_no_checkpoint_for_the_next_subject(tmp_path, dreambooth_dir, caplog):
    """The reviewer's case: dog for 4 steps with checkpoints every 2, then berry_bowl into the same folder - the
    second run used to resume from dog's step-2."""
    from customcrafter.training.trainer import train

    fields = dict(steps=4, checkpoint_every=2, prior_preservation=False)
    train(_config(tmp_path / "shared", dreambooth_dir, **fields))
    assert not (tmp_path / "shared" / "run" / "checkpoints").exists()
    with caplog.at_level("INFO", logger="customcrafter.training.trainer"):
        bowl = train(_bowl(tmp_path / "shared", dreambooth_dir, **fields))
    assert "resumed from" not in caplog.text
    assert _same_run(bowl, train(_bowl(tmp_path / "fresh", dreambooth_dir, **fields)))


def test_a_killed_run_of_another_subject_is_not_resumed(tmp_path, dreambooth_dir, monkeypatch):
    from customcrafter.training.trainer import train

    fields = dict(steps=4, checkpoint_every=2, prior_preservation=False)
    _kill_at_step(monkeypatch, _config(tmp_path / "shared", dreambooth_dir, **fields), 3)
    checkpoint = tmp_path / "shared" / "run" / "checkpoints" / "step-2"
    assert checkpoint.is_dir()
    with pytest.raises(ValueError, match=rf"{checkpoint}: checkpoint of another run: .*subject\.class_word .*"
                                         r"another output_dir, or resume=false"):
        train(_bowl(tmp_path / "shared", dreambooth_dir, **fields))
    # resume=false trains from scratch (and drops the stale checkpoints)
    bowl = train(_bowl(tmp_path / "shared", dreambooth_dir, resume=False, **fields))
    assert _same_run(bowl, train(_bowl(tmp_path / "fresh", dreambooth_dir, **fields)))
    assert not checkpoint.parent.exists()


@pytest.mark.parametrize("change", [{"lr": 2e-3}, {"seed": 7}])
def test_a_killed_run_with_other_settings_is_not_resumed(tmp_path, dreambooth_dir, monkeypatch, change):
    from customcrafter.training.trainer import train

    fields = dict(steps=4, checkpoint_every=2, prior_preservation=False)
    _kill_at_step(monkeypatch, _config(tmp_path, dreambooth_dir, **fields), 3)
    (field_name, value), = change.items()
    with pytest.raises(ValueError, match=rf"step-2: checkpoint of another run: {field_name} \(checkpoint .*, "
                                         rf"this run {value}\)"):
        train(_config(tmp_path, dreambooth_dir, **fields, **change))
    # what does not change the math (logging, checkpoint cadence, steps) still resumes
    assert train(_config(tmp_path, dreambooth_dir, **{**fields, "log_every": 1, "checkpoint_every": 3})).steps == 4


def test_a_checkpoint_without_a_fingerprint_is_not_resumed(tmp_path, dreambooth_dir, monkeypatch):
    import json

    from customcrafter.training.trainer import train

    config = _config(tmp_path, dreambooth_dir, steps=4, checkpoint_every=2, prior_preservation=False)
    _kill_at_step(monkeypatch, config, 3)
    state_file = tmp_path / "run" / "checkpoints" / "step-2" / "state.json"
    state = json.loads(state_file.read_text())
    del state["extra"]["fingerprint"]  # as written before fingerprints
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"step-2: checkpoint without a run fingerprint"):
        train(config)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_training_before_a_checkpoint_keeps_it(tmp_path, dreambooth_dir, monkeypatch, bad):
    """A loss that is NaN or inf at step 2 used to train on to the end (inf at the last step even wrote the module),
    writing checkpoints of NaN weights that a resume then continued from."""
    from customcrafter.training import trainer

    original, calls = trainer.epsilon_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * bad if calls["n"] == 2 else loss  # one branch per step (no prior preservation)

    monkeypatch.setattr(trainer, "epsilon_loss", poisoned)
    config = _config(tmp_path, dreambooth_dir, steps=6, checkpoint_every=3, prior_preservation=False, log_every=2)
    with pytest.raises(FloatingPointError) as raised:
        trainer.train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "subject_module").exists()
    assert calls["n"] == 2  # stopped at the first flush after it
    assert f"training loss is {bad} at step 2; " in str(raised.value)
    assert "max_grad_norm" in str(raised.value)


def test_clearing_checkpoints_keeps_other_files_in_the_folder(tmp_path, dreambooth_dir, monkeypatch):
    """`--output .` in a VideoCrafter checkout puts the run's checkpoints in ./checkpoints, beside the base model's
    weights (checkpoints/base_512_v2/model.ckpt): the finished run (and resume=false) removed the whole folder."""
    from customcrafter.training.trainer import train

    weights = tmp_path / "run" / "checkpoints" / "base_512_v2" / "model.ckpt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    fields = dict(steps=4, checkpoint_every=2, prior_preservation=False)
    _kill_at_step(monkeypatch, _config(tmp_path, dreambooth_dir, **fields), 3)
    checkpoints = weights.parent.parent
    (checkpoints / ".step-4.x1y2.tmp").mkdir()  # a checkpoint write killed half-way
    assert (checkpoints / "step-2").is_dir()
    train(_config(tmp_path, dreambooth_dir, resume=False, **fields))
    assert weights.read_bytes() == b"weights"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["base_512_v2"]  # only the run's own entries went


def test_a_killed_run_whose_class_images_changed_is_not_resumed(tmp_path, dreambooth_dir, monkeypatch):
    """class_images_dir was fingerprinted by its path only: other images in the same folder were resumed from the
    checkpoint trained on the first ones (and the sampler's draws no longer matched either set)."""
    import shutil

    from PIL import Image

    from customcrafter.training.trainer import train

    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (96, 64), (i * 60, 10, 10)).save(folder / f"{i}.png")
    fields = dict(steps=4, checkpoint_every=2, class_images_dir=str(folder), num_class_images=3)
    _kill_at_step(monkeypatch, _config(tmp_path, dreambooth_dir, **fields), 3)
    assert (tmp_path / "run" / "checkpoints" / "step-2").is_dir()
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    Image.new("RGB", (96, 64), (0, 200, 0)).save(folder / "1.png")
    with pytest.raises(ValueError, match=r"step-2: checkpoint of another run: class_images \(checkpoint '"):
        train(_config(tmp_path, dreambooth_dir, **fields))
    # the same images in another folder are the same run
    assert train(_config(tmp_path, dreambooth_dir, **{**fields, "class_images_dir": str(moved)})).steps == 4
