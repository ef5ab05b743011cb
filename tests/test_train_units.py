"""Training pieces that need no diffusion model: config, LoRA targets, token row, checkpoints, subject resolution."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from customcrafter.config import ConfigError, load_config
from customcrafter.training.config import REFERENCE_LR, TrainConfig


def test_config_defaults_are_the_paper_and_methods_have_their_own():
    config = TrainConfig(subject_dir="x")
    assert (config.lora_rank, config.weight_decay, config.loss, config.caption_dropout) == (4, 1e-2, "l2", 0.0)
    assert (config.prior_preservation, config.token_init) == (True, "piece")
    assert (config.num_frames, config.resolution, config.fps, config.seed) == (4, (320, 512), 16, 23)
    assert (config.resolved_lr(), config.resolved_steps()) == (3e-5, 10000)
    assert config.resolved_lr(global_batch=4) == 3e-5  # the paper's rate is not scaled with the batch
    assert TrainConfig(subject_dir="x", lr_preset="reference").resolved_lr() == REFERENCE_LR
    # Custom Diffusion: its paper's 250 steps at 1e-5 per image in a step (8e-5 at its batch of 8 = the pipeline's
    # 4 processes x instance + class clip), the rare-token start and its masked L2
    cd = TrainConfig(subject_dir="x", method="custom_diffusion")
    assert (cd.resolved_steps(), cd.resolved_lr(global_batch=4), cd.resolved_lr(global_batch=1)) == (250, 8e-5, 2e-5)
    assert (cd.prior_preservation, cd.token_init, cd.loss) == (True, "rare", "l2_masked")
    no_prior = TrainConfig(subject_dir="x", method="custom_diffusion", prior_preservation=False)
    assert no_prior.resolved_lr(global_batch=4) == 4e-5
    assert TrainConfig(subject_dir="x", method="custom_diffusion_long").resolved_steps() == 10000
    # DreamVideo (VGen): no class images, the token from the class word as a prompt token
    dv = TrainConfig(subject_dir="x", method="dreamvideo")
    assert (dv.resolved_steps(), dv.prior_preservation, dv.token_init, dv.loss) == (800, False, "word", "l2")
    assert TrainConfig(subject_dir="x", method="dreamvideo_long").resolved_steps() == 3000
    # what is given wins over the recipe
    given = TrainConfig(subject_dir="x", method="dreamvideo", prior_preservation=True, token_init="piece", loss="l1")
    assert (given.prior_preservation, given.token_init, given.loss) == (True, "piece", "l1")
    # the augmentation follows the training resolution
    assert TrainConfig(subject_dir="x", resolution=(64, 96)).augment.resolution == (64, 96)


def test_unknown_config_key_is_an_error_naming_it(tmp_path: Path):
    path = tmp_path / "train.yaml"
    path.write_text("subject_dir: x\nlearning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match="resolution"):
        load_config(TrainConfig, overrides=["subject_dir=x", "resolution=[30, 50]"])


def test_set_overrides_keep_words_that_yaml_would_change():
    """`--set` values are YAML (numbers, lists, null), but YAML 1.1 would turn `no` into false, cut `#...` as a
    comment and read `a: b` as a mapping: those stay the text the user wrote."""
    config = load_config(TrainConfig, overrides=[
        "subject_dir=x", "mixed_precision=no", "class_prompt=a photo of a {class_word} #1",
        "instance_templates=['video of a {}']", "lr=2e-5", "caption_dropout=0.1", "resolution=[64, 96]",
        "prior_preservation=off", "cuda_graphs=null"])
    assert config.mixed_precision == "no" and config.class_prompt == "a photo of a {class_word} #1"
    assert config.instance_templates == ("video of a {}",) and config.lr == 2e-5 and config.caption_dropout == 0.1
    assert config.resolution == (64, 96) and config.prior_preservation is False and config.cuda_graphs is None
    assert load_config(TrainConfig, overrides=["subject_dir=x", "class_prompt=note: a {class_word}"]
                       ).class_prompt == "note: a {class_word}"
    with pytest.raises(ConfigError, match=r"^overrides \(--set\): invalid TrainConfig: mixed_precision"):
        load_config(TrainConfig, overrides=["subject_dir=x", "mixed_precision=fp8"])
    # a bad value from an option (`train --method foo`) is blamed on the options, not on --set beside it
    with pytest.raises(ConfigError, match=r"^options: invalid TrainConfig: method"):
        load_config(TrainConfig, overrides=["overwrite=false"], subject_dir="x", method="foo")


def test_sslm_regex_selects_96_spatial_qkv_layers_of_the_full_unet():
    from customcrafter.training.methods import lora_target_regex

    try:
        from customcrafter.models.unet import VideoCrafter2UNet as UNet
    except ImportError:  # the foundation's class is the same topology plus fps
        from diffusers import UNet3DConditionModel as UNet
    with torch.device("meta"):
        unet = UNet()
    linears = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    regex = lora_target_regex("qkv")
    matched = {n: m for n, m in linears.items() if re.fullmatch(regex, n)}
    assert len(matched) == 96
    assert sum(4 * (m.in_features + m.out_features) for m in matched.values()) == 630_272
    assert not any("temp_attentions" in n or "transformer_in" in n for n in matched)
    with_out = [n for n in linears if re.fullmatch(lora_target_regex("qkv_out"), n)]
    assert len(with_out) == 128
    assert len([n for n in linears if re.fullmatch(lora_target_regex("qkv", temporal=True), n)]) == 192


@pytest.fixture(scope="module")
def tiny_text():
    """The packaged CLIP tokenizer and a one-layer text encoder (random)."""
    from importlib import resources

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = resources.files("customcrafter.models") / "tokenizer"
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77))
    return tokenizer, encoder


def test_token_row_is_the_only_one_that_learns(tiny_text):
    from customcrafter.training.tokens import add_placeholder_token, splice_new_rows, unsplice

    tokenizer, encoder = tiny_text
    table_before = encoder.get_input_embeddings().weight.detach().clone()
    token_id = add_placeholder_token(tokenizer, encoder, "<new1>", "cat")
    assert token_id == table_before.shape[0]
    table = encoder.get_input_embeddings().weight
    # initialised from the class word's non-word-final piece "cat" (the reference code's choice)
    assert torch.equal(table[token_id], table_before[tokenizer.get_vocab()["cat"]])
    assert tokenizer("<new1> cat")["input_ids"][1] == token_id

    encoder.requires_grad_(False)  # as SubjectMethod.setup does
    spliced = splice_new_rows(encoder, [token_id])
    ids = tokenizer(["a photo of <new1> cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    plain = torch.nn.functional.embedding(ids, table)
    assert torch.equal(spliced(ids), plain)  # splicing changes nothing by itself
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-2)
    assert [p.shape for group in optimizer.param_groups for p in group["params"]] == [(1, 16)]
    for _ in range(5):
        loss = encoder(input_ids=ids).last_hidden_state.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    unsplice(encoder)
    after = encoder.get_input_embeddings().weight
    assert torch.equal(after[:token_id], table_before)  # every other row bit-identical (decay never saw them)
    assert not torch.equal(after[token_id], table_before[tokenizer.get_vocab()["cat"]])


def test_multi_word_class_falls_back_to_word_tokens(tiny_text):
    from customcrafter.training.tokens import initial_embedding

    tokenizer, encoder = tiny_text
    table = encoder.get_input_embeddings().weight
    vector = initial_embedding(tokenizer, table, "stuffed animal")
    ids = tokenizer("stuffed animal", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(vector, table[ids].mean(0))


def test_rare_init_starts_from_custom_diffusions_token_whatever_the_class(tiny_text):
    from customcrafter.training.tokens import initial_embedding

    tokenizer, encoder = tiny_text
    table = encoder.get_input_embeddings().weight
    ktn = table[tokenizer.get_vocab()["ktn"]]
    for class_word in ("dog", "stuffed animal"):
        torch.testing.assert_close(initial_embedding(tokenizer, table, class_word, "rare"), ktn, rtol=0, atol=0)


def test_masked_l2_averages_over_the_mask_and_equals_l2_without_one():
    from customcrafter.training.trainer import epsilon_loss

    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 8, 8, generator=generator), torch.randn(2, 4, 3, 8, 8, generator=generator)
    ones = torch.ones(2, 1, 3, 8, 8)
    torch.testing.assert_close(epsilon_loss(pred, target, ones, "l2_masked"), epsilon_loss(pred, target, ones, "l2"))
    mask = torch.zeros(2, 1, 3, 8, 8)
    mask[0, ..., 2:6, 2:6] = 1  # example 0 zoomed out: only its pasted box counts
    mask[1] = 1
    moved = target.clone()
    moved[0, ..., :2, :] += 100.0  # outside the box: must not change the loss
    expected = ((pred[0] - target[0])[..., 2:6, 2:6].square().mean() + (pred[1] - target[1]).square().mean()) / 2
    torch.testing.assert_close(epsilon_loss(pred, target, mask, "l2_masked"), expected)
    torch.testing.assert_close(epsilon_loss(pred, moved, mask, "l2_masked"), expected)


def test_checkpoint_roundtrip_restores_rng_and_optimizer(tmp_path: Path):
    from customcrafter.training.checkpointing import (
        latest_checkpoint,
        load_checkpoint,
        restore_rng,
        save_checkpoint,
    )

    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.randn(3, 2)
    optimizer.step()
    data_rng = random.Random(5)
    data_rng.random()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, {"unet.w": param.detach()}, optimizer.state_dict(), data_rng, [1.0, 0.5],
                        {"method": "customcrafter", "stage": "s"}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-6"]
    expected = (torch.rand(4), np.random.rand(3), random.random(), data_rng.random())
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path))
    assert checkpoint.step == 6 and checkpoint.losses == [1.0, 0.5]
    assert torch.equal(checkpoint.trainable["unet.w"], param.detach())
    restore_rng(checkpoint.rng["tensors"], checkpoint.rng["info"], data_rng)
    again = (torch.rand(4), np.random.rand(3), random.random(), data_rng.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]
    fresh = torch.optim.AdamW([torch.nn.Parameter(param.detach().clone())], lr=1e-3)
    fresh.load_state_dict(checkpoint.optimizer)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(fresh.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key])


def test_bare_image_folder_needs_a_class_word(tmp_path: Path, dreambooth_dir: Path):
    from customcrafter.data.subjects import SubjectDataError
    from customcrafter.training.dataset import resolve_subject

    subject = resolve_subject(dreambooth_dir / "dog", class_word="dog", kind="live")
    assert (subject.name, subject.class_word, subject.token, subject.kind) == ("dog", "dog", "<new1>", "live")
    assert len(subject.image_paths) >= 4
    with pytest.raises(SubjectDataError, match="class-word"):
        resolve_subject(dreambooth_dir / "dog")
    with pytest.raises(SubjectDataError, match="not found"):
        resolve_subject(tmp_path / "missing", class_word="dog")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SubjectDataError, match="no images"):
        resolve_subject(tmp_path / "empty", class_word="dog")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "subject.yaml").write_text("name: bad\nclass_word: '!!'\n")
    with pytest.raises(SubjectDataError, match="class_word"):
        resolve_subject(bad)


def test_dataset_draws_still_clips_with_captions(dreambooth_dir: Path):
    from customcrafter.training.dataset import SubjectDataset, resolve_subject

    subject = resolve_subject(dreambooth_dir / "cat", class_word="cat")
    config = TrainConfig(subject_dir="x", resolution=(64, 96), prior_preservation=True)
    dataset = SubjectDataset(subject, config, class_image_paths=subject.image_paths[:2])
    batch = dataset.next_batch()
    instance, prior = batch["instance"], batch["class"]
    assert instance.pixels.shape == (3, 4, 64, 96) and instance.mask.shape == (1, 4, 8, 12)
    assert torch.equal(instance.pixels[:, 0], instance.pixels[:, 3])  # a still clip
    assert "<new1> cat" in instance.caption
    assert prior.caption == "a photo of a cat" and prior.mask.min() == 1
    again = SubjectDataset(subject, config, class_image_paths=subject.image_paths[:2]).next_batch()
    assert torch.equal(again["instance"].pixels, instance.pixels)  # seeded
    # only images that always come back the same carry a key (their VAE posterior may be reused)
    assert instance.image_key is None
    class_examples = [dataset.class_example() for _ in range(8)]
    assert {e.image_key for e in class_examples} <= {("class", 0), ("class", 1)}
    for a in class_examples:
        for b in class_examples:
            assert torch.equal(a.pixels, b.pixels) == (a.image_key == b.image_key)


def test_zoom_prefix_comes_before_the_caption_template(dreambooth_dir: Path):
    """The reference prepends "a far away " etc. to the templated caption: "a far away video of a <new1> cat",
    never "video of a a far away <new1> cat"."""
    from customcrafter.training.dataset import SubjectDataset, resolve_subject

    subject = resolve_subject(dreambooth_dir / "cat", class_word="cat")
    config = TrainConfig(subject_dir="x", resolution=(64, 96), prior_preservation=False)
    dataset = SubjectDataset(subject, config, class_image_paths=[])
    prefixes = ("", *config.augment.zoom_out_prefixes, *config.augment.zoom_in_prefixes)
    allowed = {p + t.format("<new1> cat") for p in prefixes for t in config.instance_templates}
    captions = [dataset.instance_example().caption for _ in range(40)]
    assert set(captions) <= allowed
    assert any(c.startswith(prefixes[1:]) and not c.startswith("a <new1>") for c in captions)


def test_keyed_images_are_encoded_once_and_give_the_same_latents():
    """``cache_image_moments``: a keyed image's VAE posterior is computed once and reused; the latents equal encoding
    every image afresh, and unkeyed (augmented on the fly) images are encoded every time."""
    from customcrafter.loading import load_base_pipeline
    from customcrafter.models.vae import encode_still_clip
    from customcrafter.training.trainer import DiffusionLoss

    pipe = load_base_pipeline("tiny")
    encoded = []
    encode = pipe.vae.encode
    pipe.vae.encode = lambda x, *a, **k: (encoded.append(x.shape[0]), encode(x, *a, **k))[1]
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 48, generator=generator) * 2 - 1
    images[3] = images[1]  # the same class image drawn twice in one batch
    keys = [None, ("class", 7), None, ("class", 7)]
    noise = torch.randn(4, 4, 4, 4, 6, generator=generator)
    with torch.no_grad():
        fresh = encode_still_clip(pipe.vae, images, noise)
    encoded.clear()

    config = TrainConfig(base_model="tiny", subject_dir="x", class_word="dog")
    loss = DiffusionLoss(pipe, config)
    first = loss.encode_clip(images, noise, keys)
    assert encoded == [2, 1]  # the unkeyed images in one batch, then the class image once, alone
    second = loss.encode_clip(images, noise, keys)
    assert encoded == [2, 1, 2]  # only the unkeyed images again
    torch.testing.assert_close(first, fresh, rtol=1e-5, atol=1e-6)
    assert torch.equal(first, second)

    encoded.clear()
    uncached = DiffusionLoss(pipe, config.model_copy(update={"cache_image_moments": False}))
    uncached.encode_clip(images, noise, keys)
    uncached.encode_clip(images, noise, keys)
    assert encoded == [4, 4]


def test_frozen_weights_in_bf16_keep_trained_tensors_and_token_table_fp32():
    from customcrafter.loading import load_base_pipeline
    from customcrafter.training.config import TrainConfig
    from customcrafter.training.methods import make_method
    from customcrafter.training.tokens import add_placeholder_token
    from customcrafter.training.trainer import store_frozen_in_bf16

    pipe = load_base_pipeline("tiny")
    config = TrainConfig(base_model="tiny", subject_dir="unused", mixed_precision="bf16", frozen_dtype="bf16")
    method = make_method(config)
    token_id = add_placeholder_token(pipe.tokenizer, pipe.text_encoder, "<new1>", "dog", config.token_init)
    method.setup(pipe, [token_id])
    assert store_frozen_in_bf16(pipe, method) > 0
    for name, param in pipe.unet.named_parameters():
        assert param.dtype == (torch.float32 if ".lora_" in name else torch.bfloat16), name
    for param in pipe.text_encoder.get_input_embeddings().parameters():
        assert param.dtype == torch.float32
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}

    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(subject_dir="unused", frozen_dtype="bf16")


def test_still_clip_encoding_equals_encoding_every_frame():
    """Training encodes a still clip's image once; the latents must equal encoding each of its T frames."""
    from customcrafter.loading import load_base_pipeline
    from customcrafter.models.vae import encode_still_clip, encode_video

    vae = load_base_pipeline("tiny").vae
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 48, generator=generator) * 2 - 1
    clip = image.unsqueeze(2).expand(-1, -1, 4, -1, -1)  # (B, 3, T, H, W), every frame the same image
    noise = torch.randn(2, 4, 4, 4, 6, generator=generator)
    with torch.no_grad():
        every_frame = encode_video(vae, clip, sample=True, noise=noise)
        once = encode_still_clip(vae, image, noise)
    assert once.shape == every_frame.shape == (2, 4, 4, 4, 6)
    torch.testing.assert_close(once, every_frame, rtol=1e-5, atol=1e-6)
    assert not torch.equal(once[:, :, 0], once[:, :, 1])  # each frame has its own posterior noise
    with pytest.raises(ValueError, match="noise"):
        encode_still_clip(vae, image, noise[:1])


def test_cuda_graphs_resolve_on_for_single_process_cuda_only():
    from customcrafter.training.config import TrainConfig
    from customcrafter.training.trainer import use_cuda_graphs

    def config(value, compile="none"):
        return TrainConfig(base_model="tiny", subject_dir="x", class_word="dog", cuda_graphs=value, compile=compile)

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert use_cuda_graphs(config(None), cuda, num_processes=1)
    assert not use_cuda_graphs(config(None), cuda, num_processes=4)  # untested with DDP: opt-in only
    assert use_cuda_graphs(config(True), cuda, num_processes=4)
    assert not use_cuda_graphs(config(False), cuda, num_processes=1)
    assert use_cuda_graphs(config(None, compile="full"), cuda, num_processes=1)  # the measured compiled fast path
    assert not use_cuda_graphs(config(None, compile="full"), cuda, num_processes=4)
    assert not use_cuda_graphs(config(True), cpu) and not use_cuda_graphs(config(None), cpu)


def test_a_broken_class_image_is_reported_before_training(tmp_path: Path):
    from PIL import Image

    from customcrafter.data.subjects import SubjectDataError
    from customcrafter.training.class_images import resolve_class_images
    from customcrafter.training.config import TrainConfig

    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(folder / f"{i}.png")
    config = TrainConfig(base_model="tiny", subject_dir="x", class_word="dog", class_images_dir=str(folder),
                         num_class_images=3)
    assert len(resolve_class_images(config, pipe=None, class_word="dog")) == 3
    (folder / "1.png").write_bytes(b"not a png")
    with pytest.raises(SubjectDataError, match=r"class image .*1\.png: not a readable image"):
        resolve_class_images(config, pipe=None, class_word="dog")


def test_class_images_generated_by_two_processes_at_once_keep_the_first_set(tmp_path: Path, monkeypatch):
    """Pods sharing the cache volume may generate the same class images at once: the set written first stays (a
    training run may be reading it) and both runs use it; nothing temporary is left."""
    from PIL import Image

    from customcrafter.loading import load_base_pipeline
    from customcrafter.training.class_images import (
        class_images_cache_key,
        class_images_model_id,
        resolve_class_images,
    )
    from customcrafter.training.config import TrainConfig

    config = TrainConfig(base_model="tiny", subject_dir="x", class_word="dog", num_class_images=2,
                         resolution=(64, 96), class_image_steps=2, class_images_cache_dir=str(tmp_path / "cache"))
    pipe = load_base_pipeline("tiny")
    key = class_images_cache_key(class_images_model_id(pipe), "a photo of a dog", 2, (64, 96), 2, config.seed)
    folder = tmp_path / "cache" / key
    real_call = type(pipe).__call__

    def other_pod_lands_first(self, *args, **kwargs):
        if not folder.exists():
            folder.mkdir()
            for i in range(2):
                Image.new("RGB", (96, 64), (200, i, 0)).save(folder / f"{i:04d}.png")
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", other_pod_lands_first)
    images = resolve_class_images(config, pipe, "dog")
    assert [p.name for p in images] == ["0000.png", "0001.png"]
    assert all(Image.open(p).getpixel((0, 0))[0] == 200 for p in images)  # the other pod's set
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [key]


def test_one_process_may_train_again_with_another_precision():
    """accelerate keeps one state per process and refuses a second mixed precision; training again in the same
    process (a notebook, a pipeline step running two methods) with another precision gets it."""
    from customcrafter.training.trainer import _make_accelerator

    first = _make_accelerator(TrainConfig(subject_dir="x", device="cpu", mixed_precision="no"))
    assert first.mixed_precision == "no"
    second = _make_accelerator(TrainConfig(subject_dir="x", device="cpu", mixed_precision="bf16"))
    assert second.mixed_precision == "bf16"
    assert _make_accelerator(TrainConfig(subject_dir="x", device="cpu", mixed_precision="no")).mixed_precision == "no"


@pytest.mark.parametrize("token", ["Dog", "DOG</w>"])
def test_a_token_that_normalizes_to_a_vocab_entry_is_refused(token):
    """'Dog' is not in CLIP's vocab, but the tokenizer lowercases it: added, it became 'dog' and took the class word
    over in every caption ('a Dog dog' gave the new id twice, the class prompt 'a photo of a dog' once)."""
    from importlib import resources

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from customcrafter.training.tokens import add_placeholder_token

    folder = resources.files("customcrafter.models") / "tokenizer"
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77))
    dog = tokenizer("a photo of a dog")["input_ids"]
    with pytest.raises(ValueError, match=rf"token '{token}' \(the tokenizer reads it as '{token.lower()}'\) is "
                                         "already in the tokenizer"):
        add_placeholder_token(tokenizer, encoder, token, "dog")
    assert len(tokenizer) == encoder.get_input_embeddings().weight.shape[0]  # nothing added
    assert tokenizer("a photo of a dog")["input_ids"] == dog
    # a token whose lowercase form is new is still fine (and is matched as the tokenizer reads it)
    token_id = add_placeholder_token(tokenizer, encoder, "<New1>", "dog")
    assert tokenizer("a <New1> dog")["input_ids"][2] == token_id


def _no_base_model_loading(monkeypatch) -> None:
    """Loading (or resolving: downloading, converting) the base model fails the test."""
    import customcrafter.loading as loading

    def loaded(*args, **kwargs):
        pytest.fail("the base model was loaded before the token was checked")

    for name in ("load_base_pipeline", "build_tiny_pipeline", "resolve_base_model", "_download"):
        monkeypatch.setattr(loading, name, loaded)


def _folder_with_token(folder: Path, token: str) -> Path:
    """A converted-folder stand-in whose tokenizer already holds ``token`` (e.g. saved from a pipeline with a subject
    module loaded): no weights, so only the tokenizer can be read from it."""
    from customcrafter.models.text import load_tokenizer

    tokenizer = load_tokenizer()
    tokenizer.add_tokens([token])
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text("{}")
    return folder


def test_a_token_the_base_tokenizer_has_is_refused_before_the_base_model_loads(tmp_path, dreambooth_dir,
                                                                               monkeypatch, capsys):
    """A placeholder token already in the base model's tokenizer was refused only when it was added, after the
    multi-GB base model had loaded (and the class images were drawn with it): minutes for a clash that the
    tokenizer alone decides. ('Dog'-like tokens never get that far: the subject's token pattern refuses them.)"""
    from cli_runner import run_cli

    base = _folder_with_token(tmp_path / "converted", "<new1>")
    _no_base_model_loading(monkeypatch)
    code = run_cli(["train", "--subject", str(dreambooth_dir / "dog"), "--class-word", "dog", "--token", "<new1>",
                    "--base-model", str(base), "--output", str(tmp_path / "run")])
    assert code == 2
    assert "token '<new1>' is already in the tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_token_taken_on_a_given_pipeline_is_refused_before_class_images_are_drawn(tmp_path, dreambooth_dir,
                                                                                    monkeypatch):
    """train(config, pipe=...) twice on one pipeline (a notebook): the second run's token is taken; it drew its
    class images with the base model first, then failed."""
    import customcrafter.training.class_images as class_images
    from customcrafter.loading import load_base_pipeline
    from customcrafter.training.trainer import train

    pipe = load_base_pipeline("tiny")
    pipe.tokenizer.add_tokens(["<new1>"])
    monkeypatch.setattr(class_images, "resolve_class_images", lambda *a, **k: pytest.fail("class images drawn"))
    config = TrainConfig(base_model="tiny", subject_dir=str(dreambooth_dir / "dog"), class_word="dog",
                         output_dir=str(tmp_path / "run"), prior_preservation=True)
    with pytest.raises(ValueError, match="token '<new1>' is already in the tokenizer"):
        train(config, pipe=pipe)


def test_the_multi_gpu_launcher_checks_the_token_before_converting_the_base_model(tmp_path, dreambooth_dir,
                                                                                  monkeypatch):
    from customcrafter.orchestration.local_run import run_training

    base = _folder_with_token(tmp_path / "converted", "<new1>")
    _no_base_model_loading(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = TrainConfig(subject_dir=str(dreambooth_dir / "dog"), class_word="dog", base_model=str(base),
                         output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="token '<new1>' is already in the tokenizer"):
        run_training(config)


def test_the_base_tokenizer_is_read_without_weights(tmp_path, monkeypatch):
    """A converted folder's own tokenizer/ is the one checked; a hub id or checkpoint (converted with the packaged
    tokenizer) is neither downloaded nor converted for it."""
    from customcrafter.loading import load_base_tokenizer
    from customcrafter.models.text import load_tokenizer
    from customcrafter.training.tokens import check_new_token

    folder = _folder_with_token(tmp_path / "converted", "<new1>")
    _no_base_model_loading(monkeypatch)
    with pytest.raises(ValueError, match="token '<new1>' is already in the tokenizer"):
        check_new_token(load_base_tokenizer(str(folder)), "<new1>")
    for model in ("VideoCrafter/VideoCrafter2", str(tmp_path / "model.ckpt"), "tiny"):
        check_new_token(load_base_tokenizer(model), "<new1>")  # the packaged tokenizer: <new1> is free
        assert load_base_tokenizer(model).get_vocab() == load_tokenizer().get_vocab()


def test_class_images_of_another_base_model_with_the_same_architecture_are_not_reused(tmp_path: Path):
    """The cache key named the base model by base_model_signature, a hash of its configs: VideoCrafter1 and 2 (or a
    fine-tune) share it, so the class images one had drawn were the other's prior."""
    from customcrafter.loading import load_base_pipeline
    from customcrafter.training.class_images import resolve_class_images
    from customcrafter.training.config import TrainConfig

    config = TrainConfig(base_model="tiny", subject_dir="x", class_word="dog", num_class_images=1,
                         resolution=(64, 96), class_image_steps=1, class_images_cache_dir=str(tmp_path / "cache"))
    base = load_base_pipeline("tiny")
    first = resolve_class_images(config, base, "dog")
    assert resolve_class_images(config, load_base_pipeline("tiny"), "dog") == first  # same weights: cached
    tuned = load_base_pipeline("tiny")
    with torch.no_grad():
        for param in tuned.unet.parameters():
            param.mul_(1.01)  # a "fine-tune": same configs, other weights
    second = resolve_class_images(config, tuned, "dog")
    assert second[0].parent != first[0].parent
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.parametrize("damage", ["truncated_tensors", "state_without_rng"])
def test_a_damaged_checkpoint_is_an_error_naming_the_file(tmp_path: Path, damage):
    """A truncated safetensors file raised safetensors' own error ('Error while deserializing header: invalid header
    length'), and a state.json without an entry a bare KeyError ('rng'): neither said which checkpoint or file."""
    import json

    from customcrafter.training.checkpointing import load_checkpoint, save_checkpoint

    param = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.randn(3)
    optimizer.step()
    path = save_checkpoint(tmp_path, 2, {"unet.w": param.detach()}, optimizer.state_dict(), random.Random(0), [1.0])
    if damage == "truncated_tensors":
        bad = path / "trainable.safetensors"
        bad.write_bytes(bad.read_bytes()[:20])
    else:
        bad = path / "state.json"
        state = json.loads(bad.read_text())
        del state["rng"]
        bad.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=rf"^{bad}: unreadable checkpoint \(.+\); delete {path} to restart"):
        load_checkpoint(path)
