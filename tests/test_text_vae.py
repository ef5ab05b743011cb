"""Text tower + tokenizer and VAE (image and video paths) against the original, through the converter."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from transformers import CLIPTextModel

from customcrafter.convert import convert_checkpoint
from customcrafter.models.text import encode_prompt, load_tokenizer, openclip_text_config, tokenize
from customcrafter.models.vae import decode_video, encode_video


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


def test_golden_tokenizer_ids_and_text_tower(fixtures_dir, tmp_path):
    prompts = json.loads((fixtures_dir / "tiny_openclip_text.json").read_text())["prompts"]
    goldens = load_file(str(fixtures_dir / "tiny_openclip_text_goldens.safetensors"))
    tokenizer = load_tokenizer()
    assert tokenizer.pad_token_id == 0 and tokenizer.model_max_length == 77
    assert torch.equal(tokenize(tokenizer, prompts), goldens["token_ids"])

    folder = convert_checkpoint(fixtures_dir / "tiny_openclip_text.safetensors", tmp_path / "text",
                                text_config=fixtures_dir / "tiny_openclip_text.json", components=["text_encoder"])
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    assert text_encoder.config.num_hidden_layers == 2  # 3-block tower run to the penultimate block
    err = rel_err(encode_prompt(tokenizer, text_encoder, prompts), goldens["penultimate_ln_final"])
    print(f"text golden rel err {err:.2e}")
    assert err <= 1e-4


def test_text_config_is_the_penultimate_cut():
    config = openclip_text_config()  # ViT-H-14
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.hidden_act) == (
        23, 1024, 16, "gelu")
    with pytest.raises(ValueError, match="divisible"):
        openclip_text_config(width=30, heads=4, layers=3)


def test_long_prompts_are_truncated_with_eos_last():
    ids = tokenize(load_tokenizer(), ["word " * 200, ""])
    assert ids.shape == (2, 77) and ids[0, -1] == 49407 and ids[1, :3].tolist() == [49406, 49407, 0]


@pytest.fixture
def tiny_vae(fixtures_dir, tmp_path) -> AutoencoderKL:
    folder = convert_checkpoint(fixtures_dir / "tiny_lvdm_checkpoint.safetensors", tmp_path / "vae",
                                config=fixtures_dir / "tiny_lvdm_config.yaml", components=["vae"])
    return AutoencoderKL.from_pretrained(folder / "vae").eval()


@torch.no_grad()
def test_golden_vae_image_and_video_paths(tiny_vae, fixtures_dir):
    g = load_file(str(fixtures_dir / "tiny_lvdm_goldens.safetensors"))
    errors = {
        "latent_mean": rel_err(tiny_vae.encode(g["vae.image"]).latent_dist.mean, g["vae.latent_mean"]),
        "decoded": rel_err(tiny_vae.decode(g["vae.latent_mean"]).sample, g["vae.decoded"]),
        "video_latent_scaled_mean": rel_err(encode_video(tiny_vae, g["vae.video"], sample=False),
                                            g["vae.video_latent_scaled_mean"]),
        "decode_first_stage": rel_err(decode_video(tiny_vae, g["vae.video_latent_scaled_mean"]),
                                      g["vae.decode_first_stage"]),
    }
    print("vae golden rel errs", errors)
    assert tiny_vae.config.scaling_factor == 0.18215
    assert all(e <= 1e-4 for e in errors.values()), errors
    # chunks of frames give the same result as one frame at a time
    torch.testing.assert_close(decode_video(tiny_vae, g["vae.video_latent_scaled_mean"], chunk_size=2),
                               decode_video(tiny_vae, g["vae.video_latent_scaled_mean"]), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_encode_video_samples_with_the_generator_and_checks_shapes(tiny_vae):
    video = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    a = encode_video(tiny_vae, video, generator=torch.Generator().manual_seed(0))
    b = encode_video(tiny_vae, video, generator=torch.Generator().manual_seed(0))
    mean = encode_video(tiny_vae, video, sample=False)
    assert a.shape == (1, 4, 2, 2, 2) and torch.equal(a, b) and not torch.equal(a, mean)
    with pytest.raises(ValueError, match="B, 3, T, H, W"):
        encode_video(tiny_vae, torch.zeros(1, 3, 16, 16))
