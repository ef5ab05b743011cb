"""GPU speed options that can be checked on the CPU: what they resolve to, and that the temporal-attention swap
computes the same function."""

from __future__ import annotations

import pytest
import torch


def test_channels_last_follows_compilation_unless_set():
    from customcrafter.performance import SpeedConfig

    assert SpeedConfig(compile="full").resolved_channels_last()
    assert SpeedConfig(compile="regional").resolved_channels_last()
    assert not SpeedConfig(compile="none").resolved_channels_last()
    assert SpeedConfig(compile="none", channels_last=True).resolved_channels_last()
    assert not SpeedConfig(compile="full", channels_last=False).resolved_channels_last()


@pytest.mark.parametrize("part", ["vae", "text"])
def test_vae_and_text_compilation_follow_full_compilation_unless_set(part):
    from customcrafter.performance import SpeedConfig

    def resolved(**kwargs) -> bool:
        return getattr(SpeedConfig(**kwargs), f"resolved_compile_{part}")()

    assert resolved(compile="full")
    assert not resolved(compile="regional")
    assert not resolved(compile="none")
    assert resolved(compile="none", **{f"compile_{part}": True})
    assert not resolved(compile="full", **{f"compile_{part}": False})


def test_cuda_graphs_follow_full_compilation_unless_a_mode_is_set():
    from customcrafter.performance import SpeedConfig

    assert SpeedConfig(compile="full").resolved_compile_mode() == "reduce-overhead"
    assert SpeedConfig(compile="regional").resolved_compile_mode() is None
    assert SpeedConfig(compile="none").resolved_compile_mode() is None
    assert SpeedConfig(compile="full", compile_mode="default").resolved_compile_mode() == "default"
    assert SpeedConfig(compile="regional", compile_mode="max-autotune").resolved_compile_mode() == "max-autotune"


def test_cudagraph_trees_off_compiles_every_part_with_plain_cuda_graphs(monkeypatch):
    """``cudagraph_trees=False`` gives torch.compile the options of "reduce-overhead" with inductor's plain capture
    (one graph per compiled graph), for the UNet, the VAE decoder and the text encoder alike; with trees (the
    default) or without CUDA graphs, the mode as before."""
    from customcrafter.loading import load_base_pipeline
    from customcrafter.performance import SpeedConfig, _compile_parts

    plain = {"options": {"triton.cudagraphs": True, "triton.cudagraph_trees": False}}
    assert SpeedConfig(compile="full", cudagraph_trees=False).compile_kwargs() == plain
    assert SpeedConfig(compile="full").compile_kwargs() == {"mode": "reduce-overhead"}
    assert SpeedConfig(compile="full", compile_mode="default", cudagraph_trees=False).compile_kwargs() == {
        "mode": "default"}
    assert SpeedConfig(compile="regional", cudagraph_trees=False).compile_kwargs() == {"mode": None}

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append((type(self).__name__, kwargs)))
    _compile_parts(load_base_pipeline("tiny"), SpeedConfig(compile="full", cudagraph_trees=False))
    assert sorted(name for name, _ in calls) == ["CLIPTextModel", "Decoder", "VideoCrafter2UNet"]
    assert all(kwargs.get("options") == plain["options"] and "mode" not in kwargs for _, kwargs in calls)


@pytest.mark.parametrize("kind", ["math", "efficient", "triton"])
def test_temporal_attention_swaps_only_temporal_layers_and_keeps_the_output(kind):
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    from customcrafter.loading import load_base_pipeline
    from customcrafter.performance import (
        EfficientAttnProcessor,
        TritonTemporalAttnProcessor,
        _set_sdpa,
        set_temporal_attention,
    )

    unet = load_base_pipeline("tiny").unet
    _set_sdpa(unet)
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 3, 8, 8)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        before = unet(sample, torch.tensor([10, 700]), context, fps=16).sample
        swapped = set_temporal_attention(unet, kind)
        after = unet(sample, torch.tensor([10, 700]), context, fps=16).sample

    temporal = [name for name, m in unet.named_modules() if isinstance(m, Attention) and
                ("temp_attentions" in name or name.startswith("transformer_in"))]
    spatial = [m for name, m in unet.named_modules() if isinstance(m, Attention) and name not in temporal]
    assert swapped == len(temporal) > 0
    expected = {"math": AttnProcessor, "efficient": EfficientAttnProcessor, "triton": TritonTemporalAttnProcessor}[kind]
    assert all(type(unet.get_submodule(n).processor) is expected for n in temporal)
    assert spatial and all(type(m.processor) is AttnProcessor2_0 for m in spatial)
    # A random UNet amplifies float32 rounding (~1e-7 per layer) ~1000x; a wrong attention would move it by O(1).
    assert (after - before).abs().max() <= 1e-3 * before.abs().max()

    layer = unet.get_submodule(temporal[0])
    x = torch.randn(64, 3, layer.to_q.in_features)
    with torch.no_grad():
        math = layer(x)
        layer.set_processor(AttnProcessor2_0())
        torch.testing.assert_close(math, layer(x), rtol=1e-5, atol=1e-6)


def test_optimize_pipeline_on_cpu_keeps_float32_and_eager():
    from customcrafter.loading import load_base_pipeline
    from customcrafter.performance import SpeedConfig, optimize_pipeline

    pipe = load_base_pipeline("tiny")
    forward = pipe.unet.forward
    optimize_pipeline(pipe, SpeedConfig(compile="full", temporal_attention="math", decode_chunk_size=3))
    assert pipe.unet.dtype == torch.float32 and pipe.unet.forward == forward
    assert pipe.decode_chunk_size == 3

