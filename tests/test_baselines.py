"""Baselines: Custom Diffusion and DreamVideo as strategies of the one trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from customcrafter.training.methods import attach_identity_adapters, custom_diffusion_param_names


def _spatial_container():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(0)
    root = nn.Module()
    root.block = nn.Module()
    root.block.attentions = nn.ModuleList([Transformer2DModel(num_attention_heads=2, attention_head_dim=8,
                                                              in_channels=16, cross_attention_dim=12,
                                                              norm_num_groups=4, use_linear_projection=True)])
    return root


@torch.no_grad()
def test_identity_adapter_is_parallel_to_cross_attention_on_the_residual_stream():
    root = _spatial_container()
    transformer = root.block.attentions[0]
    block = transformer.transformer_blocks[0]
    x, context = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 12)
    base = transformer(x, encoder_hidden_states=context).sample
    adapters = attach_identity_adapters(root, "subject")
    assert list(adapters) == ["block.attentions.0.transformer_blocks.0"]
    adapter = adapters["block.attentions.0.transformer_blocks.0"]
    assert (adapter.down.in_features, adapter.down.out_features, adapter.up.out_features) == (16, 8, 16)
    assert torch.equal(transformer(x, encoder_hidden_states=context).sample, base)  # zero-init: unchanged

    nn.init.normal_(adapter.up.weight)
    nn.init.normal_(adapter.up.bias)
    # The block's cross-attention sub-layer by hand: h + attn2(norm2(h)) + Adapter(h), h the un-normalised stream.
    captured = {}
    block.norm2.register_forward_pre_hook(lambda m, args: captured.setdefault("h", args[0].clone()))
    block.attn2.register_forward_hook(lambda m, args, out: captured.setdefault("attn2_with_adapter", out.clone()))
    transformer(x, encoder_hidden_states=context)
    h = captured["h"]
    expected = block.attn2.processor(block.attn2, block.norm2(h), encoder_hidden_states=context) + adapter(h)
    torch.testing.assert_close(captured["attn2_with_adapter"], expected)


# --- on the tiny base model ---------------------------------------------------------------------------------------
def _train(tmp_path: Path, dreambooth_dir: Path, method: str, **fields):
    from customcrafter.loading import load_base_pipeline
    from customcrafter.training.config import TrainConfig
    from customcrafter.training.trainer import train

    pipe = load_base_pipeline("tiny")
    before = _snapshot(pipe)
    values = dict(method=method, base_model="tiny", subject_dir=str(dreambooth_dir / "dog"), class_word="dog",
                  output_dir=str(tmp_path / method), resolution=(64, 96), num_frames=2, steps=4,
                  prior_preservation=True, num_class_images=2, class_image_steps=2,
                  class_images_cache_dir=str(tmp_path / "class_cache"), checkpoint_every=None, lr=1e-3)
    values.update(fields)
    result = train(TrainConfig(**values), pipe=pipe)
    return pipe, before, result


def _snapshot(pipe) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()}
    state.update({f"text.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()})
    state.update({f"vae.{k}": v.clone() for k, v in pipe.vae.state_dict().items()})
    return state


def _changed(pipe, before) -> set[str]:
    after = _snapshot(pipe)
    table = "text.embeddings.token_embedding.weight"
    changed = {k for k in before if k != table and not torch.equal(before[k], after[k])}
    rows = before[table].shape[0]
    if not torch.equal(after[table][:rows], before[table]):
        changed.add("text.embedding_rows_of_existing_tokens")
    return changed


@pytest.mark.parametrize("method", ["custom_diffusion", "dreamvideo"])
def test_exactly_the_intended_parameters_change(tmp_path, dreambooth_dir, method):
    fields = {"dreamvideo": {"inversion_steps": 3}} if method == "dreamvideo" else {}
    pipe, before, result = _train(tmp_path, dreambooth_dir, method, **fields)
    changed = _changed(pipe, before)
    if method == "custom_diffusion":
        intended = {f"unet.{n}" for n in custom_diffusion_param_names(pipe.unet)}
        assert intended and changed == intended
    else:
        assert changed == set()  # the UNet's own weights never move; the adapter is extra
        adapter_keys = [k for k in pipe.unet.state_dict() if ".identity_adapters." in k]
        assert adapter_keys and all(".attentions." in k and "temp_attentions" not in k for k in adapter_keys)
    table = pipe.text_encoder.get_input_embeddings().weight
    assert table.shape[0] == before["text.embeddings.token_embedding.weight"].shape[0] + 1
    assert len(result.losses) == result.steps == (4 if method == "custom_diffusion" else 7)
    assert (result.module_dir / "module.json").is_file()
    assert not any(part.training for part in (pipe.unet, pipe.text_encoder, pipe.vae))  # back as loaded


def test_dreamvideo_trains_without_class_images_by_default(tmp_path, dreambooth_dir):
    _, _, result = _train(tmp_path, dreambooth_dir, "dreamvideo", prior_preservation=None, steps=1, lr=None,
                          dreamvideo={"inversion_steps": 1})
    assert result.steps == 2 and not (tmp_path / "class_cache").exists()  # VGen: no prior loss, none generated
    meta = json.loads((result.module_dir / "module.json").read_text())
    assert meta["train_config"]["prior_preservation"] is False
    # what ran is recorded (the config's lr may be None): the stages with their resolved rates
    assert meta["train_schedule"] == result.schedule == {
        "processes": 1, "global_batch": 1, "stages": [{"name": "textual_inversion", "steps": 1, "lr": 1e-4},
                                                      {"name": "identity_adapter", "steps": 1, "lr": 1e-5}]}


def test_start_token_key_and_value_get_no_gradient():
    from customcrafter.loading import load_base_pipeline
    from customcrafter.training.methods import custom_diffusion_param_names
    from customcrafter.training.trainer import detach_start_token_kv

    unet = load_base_pipeline("tiny").unet
    params = dict(unet.named_parameters())
    names = custom_diffusion_param_names(unet)
    for name in names:
        params[name].requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 2, 8, 12, generator=generator)
    context = torch.zeros(1, 77, unet.config.cross_attention_dim)
    context[:, 0] = torch.randn(unet.config.cross_attention_dim, generator=generator)  # only the start token

    def largest_gradient(detached: bool) -> float:
        unet.zero_grad()
        handles = detach_start_token_kv(unet) if detached else []
        unet(latents, torch.tensor([500]), encoder_hidden_states=context, fps=torch.tensor([16])).sample.square() \
            .mean().backward()
        for handle in handles:
            handle.remove()
        return max(params[name].grad.abs().max().item() for name in names)

    assert largest_gradient(False) > 0 and largest_gradient(True) == 0


@pytest.mark.parametrize("method", ["custom_diffusion", "dreamvideo"])
def test_saved_baseline_reloads_and_reproduces_a_video(tmp_path, dreambooth_dir, method):
    from customcrafter.loading import load_base_pipeline
    from customcrafter.sampling import SampleConfig, last_sampling_record, sample_video
    from customcrafter.subject_module import load_subject_module

    fields = {"dreamvideo": {"inversion_steps": 2}} if method == "dreamvideo" else {}
    trained, _, result = _train(tmp_path, dreambooth_dir, method, steps=2, **fields)
    config = SampleConfig(num_inference_steps=3, num_frames=2, height=64, width=96)
    # (the trained pipeline has no loaded-module record to take the training fps from)
    from_training = sample_video(trained, "<new1> dog on a beach", seed=3, config=config.model_copy(update={"fps": 16}))
    videos = []
    for _ in range(2):
        pipe = load_base_pipeline("tiny")
        loaded = load_subject_module(pipe, result.module_dir)
        assert loaded.method == method and not loaded.uses_lora
        videos.append(sample_video(pipe, "<new1> dog on a beach", seed=3, config=config))
        assert last_sampling_record(pipe)["scales"] == []  # plain DDIM, no DWVSS
    base = sample_video(load_base_pipeline("tiny"), "<new1> dog on a beach", seed=3, config=config)
    assert videos[0].dtype == "uint8" and (videos[0] == videos[1]).all()
    assert not (videos[0] == base).all()  # the module changes the video
    # what was saved is what was trained (Custom Diffusion's deltas W - W0 add back within float rounding)
    assert np.abs(videos[0].astype(int) - from_training.astype(int)).max() <= 1
