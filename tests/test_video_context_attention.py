"""Spatial cross-attention with its keys and values once per video (``performance.VideoContextAttnProcessor``,
``use_video_context_attention``, ``VideoCrafter2UNet.context_per_video``): the same function as per frame, with
``to_k``/``to_v`` on one context per video. float64 throughout: the tiny random UNet amplifies float32 rounding to
~1e-3, which would hide a wrong frame-to-video assignment; in float64 its outputs differ by ~1e-12 at most."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from customcrafter.performance import SpeedConfig, VideoContextAttnProcessor, use_video_context_attention


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


def _layer(**kwargs) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=24, cross_attention_dim=16, heads=3, dim_head=8, bias=True, **kwargs).double().eval()


def _spy_fallback(processor: VideoContextAttnProcessor) -> list:
    calls, inner = [], processor.fallback

    def fallback(*args, **kwargs):
        calls.append(args[1].shape)
        return inner(*args, **kwargs)

    processor.fallback = fallback
    return calls


@pytest.mark.parametrize("frames", [3, 1])
@pytest.mark.parametrize("residual", [False, True])
def test_processor_equals_sdpa_on_the_context_repeated_per_frame(frames, residual):
    layer = _layer(residual_connection=residual, rescale_output_factor=2.0 if residual else 1.0)
    g = torch.Generator().manual_seed(1)
    videos = 2
    hidden = torch.randn(videos * frames, 5, 24, generator=g, dtype=torch.float64)
    context = torch.randn(videos, 7, 16, generator=g, dtype=torch.float64)
    key_rows = []
    layer.to_k.register_forward_hook(lambda m, args, out: key_rows.append(args[0].shape[0]))
    with torch.no_grad():
        reference = layer(hidden, encoder_hidden_states=context.repeat_interleave(frames, dim=0))
        processor = VideoContextAttnProcessor()
        fallback_calls = _spy_fallback(processor)
        layer.set_processor(processor)
        ours = layer(hidden, encoder_hidden_states=context)
        # the repeated context (a UNet whose flag stays off) gives the same too, per frame
        repeated = layer(hidden, encoder_hidden_states=context.repeat_interleave(frames, dim=0))
    assert key_rows == [videos * frames, videos, videos * frames]  # keys once per video
    assert not fallback_calls
    assert ours.shape == reference.shape == hidden.shape
    assert rel_err(ours, reference) < 1e-12 and rel_err(repeated, reference) < 1e-12
    # the frames really see their own video's context: swapping the two contexts changes every frame's output
    with torch.no_grad():
        swapped = layer(hidden, encoder_hidden_states=context.flip(0))
    assert (swapped - ours).reshape(videos * frames, -1).abs().amax(dim=1).min() > 1e-3


def test_processor_in_bf16_matches_to_bf16_rounding():
    layer = _layer().to(torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(8, 5, 24, generator=g).to(torch.bfloat16)
    context = torch.randn(2, 7, 16, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        reference = layer(hidden, encoder_hidden_states=context.repeat_interleave(4, dim=0))
        layer.set_processor(VideoContextAttnProcessor())
        ours = layer(hidden, encoder_hidden_states=context)
    assert ours.dtype == torch.bfloat16 and ours.shape == hidden.shape
    torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-2)


def test_processor_falls_back_with_a_mask_or_a_cross_norm():
    g = torch.Generator().manual_seed(2)
    frames, videos = 3, 2
    hidden = torch.randn(videos * frames, 5, 24, generator=g, dtype=torch.float64)
    context = torch.randn(videos, 7, 16, generator=g, dtype=torch.float64)
    mask = torch.zeros(videos * frames, 1, 7, dtype=torch.float64)
    mask[..., -2:] = -10000.0  # the last two tokens masked out, per frame
    per_frame = context.repeat_interleave(frames, dim=0)

    layer = _layer()
    with torch.no_grad():
        reference = layer(hidden, encoder_hidden_states=per_frame, attention_mask=mask)
        unmasked = layer(hidden, encoder_hidden_states=per_frame)
        processor = VideoContextAttnProcessor()
        calls = _spy_fallback(processor)
        layer.set_processor(processor)
        ours = layer(hidden, encoder_hidden_states=context, attention_mask=mask)
    assert calls == [hidden.shape]
    assert rel_err(ours, reference) < 1e-12 and rel_err(unmasked, reference) > 1e-3  # the mask mattered

    layer = _layer(cross_attention_norm="layer_norm")
    with torch.no_grad():
        reference = layer(hidden, encoder_hidden_states=per_frame)
        processor = VideoContextAttnProcessor()
        calls = _spy_fallback(processor)
        layer.set_processor(processor)
        ours = layer(hidden, encoder_hidden_states=context)
    assert calls == [hidden.shape]
    assert rel_err(ours, reference) < 1e-12


# --- the tiny UNet ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_unet():
    from customcrafter.loading import build_tiny_pipeline

    return build_tiny_pipeline().unet.double().eval()


def _copy(unet):
    return copy.deepcopy(unet)


def _spatial_cross_attentions(unet) -> dict[str, Attention]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}


def _record_key_rows(unet) -> list[int]:
    rows = []
    for layer in _spatial_cross_attentions(unet).values():
        layer.to_k.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    return rows


def _inputs(latents: int, contexts: int, frames: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(latents, 4, frames, 8, 8, generator=g, dtype=torch.float64),
            torch.tensor([10, 700][:latents]),
            torch.randn(contexts, 7, 32, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("latents, contexts", [(2, 2), (1, 2), (2, 4)], ids=["batch", "cfg-one-latent", "cfg-batch"])
def test_unet_with_context_per_video_equals_the_per_frame_unet(tiny_unet, latents, contexts):
    """Ordinary batch and the guidance path (one latent for several contexts: ``_context_free_prefix`` and
    ``_rest_of_first_block``): same output; the flag is set and the keys see one context per video."""
    frames = 3
    reference, unet = _copy(tiny_unet), _copy(tiny_unet)
    layers = _spatial_cross_attentions(unet)
    assert not unet.context_per_video and type(unet).context_per_video is False
    assert use_video_context_attention(unet) == len(layers) > 0
    assert unet.context_per_video
    assert all(isinstance(m.processor, VideoContextAttnProcessor) for m in layers.values())
    # self-attention and the temporal transformers keep theirs
    others = [m for m in unet.modules() if isinstance(m, Attention) and not m.is_cross_attention]
    assert others and all(type(m.processor) is AttnProcessor2_0 for m in others)

    x, t, c = _inputs(latents, contexts, frames)
    ref_rows, rows = _record_key_rows(reference), _record_key_rows(unet)
    with torch.no_grad():
        expected = reference(x, t, c, fps=16).sample
        ours = unet(x, t, c, fps=16).sample
    assert set(ref_rows) == {contexts * frames} and set(rows) == {contexts}  # no per-frame copies of the context
    assert len(rows) == len(layers)
    assert ours.shape == expected.shape == (contexts, 4, frames, 8, 8)
    assert rel_err(ours, expected) < 1e-10
    if contexts > latents:  # the contexts reached the shared latents
        assert (ours[:latents] - ours[latents:]).abs().max() > 1e-3


def _add_sslm_lora(unet, seed: int = 1) -> None:
    """The CustomCrafter SSLM adapter (spatial attn1/attn2 q/k/v) with random up-projections."""
    from customcrafter.training.config import TrainConfig
    from customcrafter.training.methods import CustomCrafterMethod

    method = CustomCrafterMethod(TrainConfig(subject_dir="unused", base_model="random"))
    torch.manual_seed(seed)
    unet.add_adapter(method.lora_config(), adapter_name="subject")
    unet.double()
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)


def test_lora_and_dwvss_fused_scales_give_the_same_output(tiny_unet):
    from peft.tuners.lora import LoraLayer

    from customcrafter.dwvss import LoraPhaseFuser

    base = _copy(tiny_unet)
    _add_sslm_lora(base)
    reference, unet = _copy(base), _copy(base)
    use_video_context_attention(unet)
    assert unet.context_per_video
    assert all(isinstance(m.to_k, LoraLayer) and isinstance(m.to_v, LoraLayer)
               for m in _spatial_cross_attentions(unet).values())
    x, t, c = _inputs(1, 2)
    outputs = {}
    with torch.no_grad():
        for name, model in (("reference", reference), ("ours", unet)):
            plain = model(x, t, c, fps=16).sample
            with LoraPhaseFuser(model) as fuser:
                fuser.set_scale(0.5)
                half = model(x, t, c, fps=16).sample
                fuser.set_scale(0.0)
                off = model(x, t, c, fps=16).sample
            outputs[name] = plain, half, off
        without = tiny_unet(x, t, c, fps=16).sample
    for ours, expected in zip(outputs["ours"], outputs["reference"], strict=True):
        assert rel_err(ours, expected) < 1e-10
    plain, half, off = outputs["ours"]
    assert rel_err(plain, without) > 1e-3 and rel_err(half, plain) > 1e-4  # the adapter and its scale count
    assert rel_err(off, without) < 1e-10


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_equal_the_per_frame_unets(tiny_unet, checkpointing):
    base = _copy(tiny_unet)
    _add_sslm_lora(base)
    base.requires_grad_(False)
    for name, param in base.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
    reference, unet = _copy(base), _copy(base)
    use_video_context_attention(unet)
    assert unet.context_per_video
    results = []
    for model in (reference, unet):
        if checkpointing:
            model.enable_gradient_checkpointing()
        x, t, c = _inputs(2, 2, frames=2, seed=3)
        c.requires_grad_(True)
        model(x, t, c, fps=16).sample.square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((grads, c.grad))
    (ref_grads, ref_context), (grads, context) = results
    assert grads.keys() == ref_grads.keys() and any(".attn2.to_k.lora_A" in n for n in grads)
    # The tiny random UNet is chaotic: merely running the examples one at a time moves its float64 gradients by ~5e-9
    # (relative), a wrong attention by O(1). Compared as one vector: some gradients are ~0 (the mid block's
    # self-attention q/k over a single position).
    assert rel_err(torch.cat([grads[n].flatten() for n in ref_grads]),
                   torch.cat([ref_grads[n].flatten() for n in ref_grads])) < 1e-8
    cross = [n for n in ref_grads if ".attn2.to_k." in n or ".attn2.to_v." in n]
    assert cross and max(rel_err(grads[n], ref_grads[n]) for n in cross) < 1e-8
    assert rel_err(context, ref_context) < 1e-8  # the context's gradient sums its frames' as repeat_interleave's


def test_a_custom_processor_is_left_alone_and_keeps_the_repeated_context(tiny_unet):
    class Custom:  # e.g. a training method's own processor: expects the per-frame context
        def __init__(self):
            self.inner, self.contexts = AttnProcessor2_0(), []

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            self.contexts.append(encoder_hidden_states.shape[0])
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    reference, unet = _copy(tiny_unet), _copy(tiny_unet)
    layers = _spatial_cross_attentions(unet)
    names = list(layers)
    custom = Custom()
    layers[names[0]].set_processor(custom)
    layers[names[1]].set_processor(AttnProcessor())  # diffusers' plain processor: switched too
    assert use_video_context_attention(unet) == len(layers) - 1
    assert layers[names[0]].processor is custom and not unet.context_per_video
    assert all(isinstance(layers[n].processor, VideoContextAttnProcessor) for n in names[1:])
    frames = 3
    x, t, c = _inputs(2, 2, frames)
    rows = _record_key_rows(unet)
    with torch.no_grad():
        expected = reference(x, t, c, fps=16).sample
        ours = unet(x, t, c, fps=16).sample
    assert custom.contexts == [2 * frames] and set(rows) == {2 * frames}
    assert rel_err(ours, expected) < 1e-10

    # switching again changes nothing more; once the custom one is plain again, the flag comes on
    assert use_video_context_attention(unet) == 0 and not unet.context_per_video
    layers[names[0]].set_processor(AttnProcessor2_0())
    assert use_video_context_attention(unet) == 1 and unet.context_per_video


# --- SpeedConfig and optimize_pipeline ----------------------------------------------------------------------------
def test_context_per_video_follows_compilation_unless_set():
    assert SpeedConfig().resolved_context_per_video(compiled=True)
    assert not SpeedConfig().resolved_context_per_video(compiled=False)
    assert SpeedConfig(context_per_video=True).resolved_context_per_video(compiled=False)
    assert not SpeedConfig(context_per_video=False).resolved_context_per_video(compiled=True)


def _processors(module) -> list[type]:
    return [type(m.processor) for m in module.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("compile_mode, explicit, expected", [("full", None, True), ("none", None, False),
                                                              ("none", True, True), ("full", False, False)])
def test_layer_rewrites_switch_the_unet_only(compile_mode, explicit, expected):
    from customcrafter.loading import build_tiny_pipeline
    from customcrafter.performance import _layer_rewrites, prepare_unet_for_compiled_training

    pipe = build_tiny_pipeline()
    vae_processors = _processors(pipe.vae)
    _layer_rewrites(pipe, SpeedConfig(compile=compile_mode, context_per_video=explicit))
    assert pipe.unet.context_per_video is expected
    switched = [p is VideoContextAttnProcessor for p in _processors(pipe.unet)]
    assert sum(switched) == (len(_spatial_cross_attentions(pipe.unet)) if expected else 0)
    assert _processors(pipe.vae) == vae_processors

    unet = build_tiny_pipeline().unet
    prepare_unet_for_compiled_training(unet)  # compiled training: on
    assert unet.context_per_video


def test_sdpa_keeps_the_processor_and_cpu_optimize_pipeline_changes_nothing():
    from customcrafter.loading import build_tiny_pipeline
    from customcrafter.performance import _set_sdpa, optimize_pipeline

    pipe = build_tiny_pipeline()
    before = _processors(pipe.unet)
    optimize_pipeline(pipe, SpeedConfig(compile="full", context_per_video=True))
    assert _processors(pipe.unet) == before and VideoContextAttnProcessor not in before
    assert not pipe.unet.context_per_video

    use_video_context_attention(pipe.unet)
    _set_sdpa(pipe.unet)  # e.g. optimize_pipeline a second time: the flag's processors stay
    assert pipe.unet.context_per_video
    assert sum(p is VideoContextAttnProcessor for p in _processors(pipe.unet)) == len(
        _spatial_cross_attentions(pipe.unet))


def test_full_compile_traces_the_switched_unet_without_graph_breaks(tiny_unet):
    """The processor is plain tensor code for dynamo: the whole UNet forward stays one graph ('eager' backend: the
    traced graph run as it is)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from customcrafter.performance import compile_unet

    torch._dynamo.reset()
    counters.clear()
    unet = _copy(tiny_unet)
    use_video_context_attention(unet)
    x, t, c = _inputs(1, 2)
    with torch.no_grad():
        expected = unet(x, t, c, fps=16).sample
        compile_unet(unet, "full", backend="eager")
        ours = unet(x, t, c, fps=16).sample
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert torch.equal(ours, expected)
