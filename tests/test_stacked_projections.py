"""Stacked attention projections (``customcrafter.fusions.use_stacked_projections``): one matmul for q/k/v, the
same function, and weights that stay shared with the stack through everything that changes them."""

from __future__ import annotations

import copy

import pytest
import torch


def _unet():
    """The tiny UNet with the processors ``optimize_pipeline`` sets on a GPU (their plain path runs on the CPU)."""
    from customcrafter.loading import load_base_pipeline
    from customcrafter.performance import _set_sdpa, set_temporal_attention

    unet = load_base_pipeline("tiny").unet
    _set_sdpa(unet)
    set_temporal_attention(unet, "triton")
    return unet


def _forward(unet) -> torch.Tensor:
    torch.manual_seed(0)
    dtype = unet.dtype
    sample = torch.randn(2, 4, 3, 16, 16, dtype=dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=dtype)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), context, fps=16).sample


def _attentions(unet):
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


def _add_lora(unet, seed: int = 3) -> None:
    from customcrafter.training.config import TrainConfig
    from customcrafter.training.methods import CustomCrafterMethod

    config = CustomCrafterMethod(TrainConfig(subject_dir="unused", base_model="tiny")).lora_config()
    config.init_lora_weights = False  # random up-projections: the branch must show in the output
    torch.manual_seed(seed)
    unet.add_adapter(config, adapter_name="subject")


def test_stacked_unet_computes_the_same_function_through_one_matmul_with_the_same_state():
    from customcrafter import fusions

    unet = _unet()
    keys = list(unet.state_dict())
    before = _forward(unet)
    attentions = _attentions(unet)
    assert fusions.use_stacked_projections(unet) == len(attentions) > 0
    assert fusions.use_stacked_projections(unet) == 0
    fusions.check_stacked_projections(unet)

    # The stacked path never calls the separate k projections (q too, for self-attention).
    called = []
    for attn in attentions:
        attn.to_k.register_forward_hook(lambda *_: called.append("k"))
        if not attn.is_cross_attention:
            attn.to_q.register_forward_hook(lambda *_: called.append("q"))
    after = _forward(unet)
    assert called == []
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert list(unet.state_dict()) == keys
    for attn in attentions:
        width = attn.to_k.weight.shape[0]
        assert attn.stacked_weight.shape[0] == width * (2 if attn.is_cross_attention else 3)
        torch.testing.assert_close(attn.stacked_weight[-width:], attn.to_v.weight, rtol=0, atol=0)


def test_in_place_weight_changes_and_dtype_moves_reach_the_stacked_path():
    """DWVSS fuses the LoRA into the q/k/v weights in place; a ``.to()`` gives the weights new memory."""
    from customcrafter import fusions
    from customcrafter.dwvss import LoraPhaseFuser

    plain = _unet()
    _add_lora(plain)
    stacked = copy.deepcopy(plain)
    assert fusions.use_stacked_projections(stacked) > 0
    for model in (plain, stacked):
        model.to(torch.float64)
    fusions.check_stacked_projections(stacked)

    # LoRA branch active: the stacked layers fall back to the separate (wrapped) projections.
    with_lora = _forward(plain)
    torch.testing.assert_close(_forward(stacked), with_lora, rtol=1e-9, atol=1e-9)
    for scale in (0.4, 0.8):
        with LoraPhaseFuser(plain) as fused_plain, LoraPhaseFuser(stacked) as fused_stacked:
            fused_plain.set_scale(scale)
            fused_stacked.set_scale(scale)
            expected = _forward(plain)
            torch.testing.assert_close(_forward(stacked), expected, rtol=1e-9, atol=1e-9)
            assert (expected - with_lora).abs().max() > 1e-6  # the scale did change the output
    # Restored weights: the stack holds the originals again.
    torch.testing.assert_close(_forward(stacked), with_lora, rtol=1e-9, atol=1e-9)


def test_replaced_weights_are_reported_by_name():
    from customcrafter import fusions

    unet = _unet()
    fusions.use_stacked_projections(unet)
    name, attn = next((n, m) for n, m in unet.named_modules() if isinstance(m, fusions.StackedProjections))
    attn.to_v.weight.data = attn.to_v.weight.data.clone()
    with pytest.raises(RuntimeError, match=rf"{name}\.to_v"):
        fusions.check_stacked_projections(unet)


def test_layers_with_a_projection_bias_are_not_stacked():
    from diffusers.models.attention_processor import Attention

    from customcrafter import fusions

    biased = Attention(16, heads=2, dim_head=8, bias=True)
    plain = Attention(16, heads=2, dim_head=8)
    model = torch.nn.ModuleList([biased, plain])
    assert fusions.use_stacked_projections(model) == 1
    assert not isinstance(biased, fusions.StackedProjections) and isinstance(plain, fusions.StackedProjections)


def test_speed_config_stacks_by_default():
    from customcrafter import fusions
    from customcrafter.loading import load_base_pipeline
    from customcrafter.performance import SpeedConfig, _layer_rewrites

    for config, expected in ((SpeedConfig(), True), (SpeedConfig(stacked_projections=False), False)):
        pipe = load_base_pipeline("tiny")
        _layer_rewrites(pipe, config)
        assert all(isinstance(m, fusions.StackedProjections) == expected for m in _attentions(pipe.unet))
