"""The exact layer rewrites of ``customcrafter.fusions`` compute the same function as the layers they replace (float64
to rounding), keep the models' parameters and state dicts, and are switched on where ``SpeedConfig`` says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("size", [(5, 7), (1, 1), (4, 6)])
def test_subpixel_upsample_conv_equals_upsample_then_conv(channels_last, bias, size):
    from customcrafter.fusions import subpixel_upsample_conv

    torch.manual_seed(0)
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1, bias=bias).double()
    expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    out = subpixel_upsample_conv(x, conv.weight, conv.bias)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last) == (channels_last and size != (1, 1))


@pytest.mark.parametrize("shape", [(3, 64, 5, 7), (2, 64, 3, 4, 5)])
@pytest.mark.parametrize("affine", [False, True])
def test_channel_stats_group_norm_equals_group_norm(shape, affine):
    from customcrafter.fusions import channel_stats_group_norm

    torch.manual_seed(0)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 5).contiguous(memory_format=fmt)
    weight = torch.rand(64, dtype=torch.float64) + 0.5 if affine else None
    bias = torch.randn(64, dtype=torch.float64) if affine else None
    torch.testing.assert_close(channel_stats_group_norm(x, 16, weight, bias, 1e-6),
                               F.group_norm(x, 16, weight, bias, 1e-6), rtol=0, atol=1e-10)


def test_channel_stats_group_norm_stays_accurate_far_from_zero_mean():
    """Per-channel Welford statistics combined exactly: no E[x^2] - E[x]^2 cancellation when the mean dwarfs the
    spread (float32 inputs with mean 100 and spread 3)."""
    from customcrafter.fusions import channel_stats_group_norm

    torch.manual_seed(0)
    x = torch.randn(2, 64, 6, 16, 16, dtype=torch.float64) * 3 + 100
    expected = F.group_norm(x, 32, None, None, 1e-6)
    out = channel_stats_group_norm(x.float(), 32, None, None, 1e-6)
    assert out.dtype == torch.float32
    assert (out.double() - expected).abs().max() < 1e-4


@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 6)])
@pytest.mark.parametrize("bias", [False, True])
def test_unfused_bias_linear_equals_linear(shape, bias):
    from customcrafter.fusions import unfused_bias_linear

    torch.manual_seed(0)
    x, weight = torch.randn(shape, dtype=torch.float64), torch.randn(4, shape[-1], dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64) if bias else None
    torch.testing.assert_close(unfused_bias_linear(x, weight, b), F.linear(x, weight, b), rtol=1e-12, atol=1e-12)


def test_unfused_bias_linears_leave_lora_layers_working():
    """peft wraps the LoRA targets (bias-free q/k/v) around plain Linear layers: only biased layers switch, and the
    LoRA branch still adds its update."""
    from peft import LoraConfig, get_peft_model

    from customcrafter import fusions

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6, bias=False), torch.nn.Linear(6, 3)).double()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        before = peft_model(x)
        assert fusions.use_unfused_bias_linears(peft_model) == 1
        torch.testing.assert_close(peft_model(x), before, rtol=1e-12, atol=1e-12)
        with peft_model.disable_adapter():
            assert (peft_model(x) - before).abs().max() > 1e-3  # the LoRA branch did contribute


def _tiny_pipeline():
    from customcrafter.loading import load_base_pipeline

    return load_base_pipeline("tiny")


def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 3, 16, 16)
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    latents = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        return (pipe.unet(sample, torch.tensor([10, 700]), context, fps=16).sample,
                pipe.vae.decode(latents).sample)


def test_rewritten_unet_and_vae_compute_the_same_function_with_the_same_state(monkeypatch):
    from diffusers.models.upsampling import Upsample2D

    from customcrafter import fusions

    pipe = _tiny_pipeline()
    keys = {name: list(part.state_dict()) for name, part in (("unet", pipe.unet), ("vae", pipe.vae))}
    unet_before, vae_before = _outputs(pipe)
    monkeypatch.setattr(fusions, "SUBPIXEL_MIN_POSITIONS", 0)  # the tiny model's maps are all small
    calls = []
    original = fusions.subpixel_upsample_conv
    monkeypatch.setattr(fusions, "subpixel_upsample_conv", lambda *a: calls.append(a) or original(*a))

    upsamplers = [m for part in (pipe.unet, pipe.vae.decoder) for m in part.modules() if isinstance(m, Upsample2D)]
    norms = [m for part in (pipe.unet, pipe.vae.decoder) for m in part.modules() if isinstance(m, torch.nn.GroupNorm)]
    linears = [m for part in (pipe.unet, pipe.vae.decoder) for m in part.modules()
               if isinstance(m, torch.nn.Linear) and m.bias is not None]
    switched = sum(fusions.use_subpixel_upsamplers(part) for part in (pipe.unet, pipe.vae.decoder))
    assert switched == len(upsamplers) > 0
    assert sum(fusions.use_channel_stats_group_norm(part) for part in (pipe.unet, pipe.vae.decoder)) == len(norms)
    assert sum(fusions.use_unfused_bias_linears(part) for part in (pipe.unet, pipe.vae.decoder)) == len(linears) > 0
    assert all(isinstance(m, fusions.SubpixelUpsample2D) and isinstance(m, Upsample2D) for m in upsamplers)
    assert all(isinstance(m, fusions.ChannelStatsGroupNorm) for m in norms)
    assert all(isinstance(m, fusions.UnfusedBiasLinear) for m in linears)
    assert fusions.use_subpixel_upsamplers(pipe.unet) == 0 and fusions.use_channel_stats_group_norm(pipe.unet) == 0
    assert fusions.use_unfused_bias_linears(pipe.unet) == 0

    unet_after, vae_after = _outputs(pipe)
    assert len(calls) == switched  # every upsampler went through the sub-pixel form
    # A random UNet amplifies float32 rounding (~1e-7 per layer) ~1000x; a wrong rewrite would move it by O(1).
    assert (unet_after - unet_before).abs().max() <= 1e-4 * unet_before.abs().max()
    assert (vae_after - vae_before).abs().max() <= 1e-4 * vae_before.abs().max()
    assert {name: list(part.state_dict()) for name, part in (("unet", pipe.unet), ("vae", pipe.vae))} == keys


def test_subpixel_upsampler_keeps_the_plain_form_for_small_maps_and_other_sizes(monkeypatch):
    from diffusers.models.upsampling import Upsample2D

    from customcrafter import fusions

    upsampler = Upsample2D(8, use_conv=True).double()
    fusions.use_subpixel_upsamplers(upsampler)

    def forbidden(*args):
        raise AssertionError("the sub-pixel form was used")

    monkeypatch.setattr(fusions, "subpixel_upsample_conv", forbidden)
    x = torch.randn(1, 8, 16, 16, dtype=torch.float64)  # 256 positions < SUBPIXEL_MIN_POSITIONS
    with torch.no_grad():
        plain = upsampler.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        torch.testing.assert_close(upsampler(x), plain)
        monkeypatch.setattr(fusions, "SUBPIXEL_MIN_POSITIONS", 0)
        odd = upsampler(x, output_size=(31, 33))  # a forced size that is not 2x: the original path
        assert odd.shape[-2:] == (31, 33)


@pytest.mark.parametrize("compile_mode", ["none", "full"])
def test_speed_config_switches_the_rewrites_on_where_they_pay(compile_mode):
    """Sub-pixel upsampling whatever the mode; channel-statistics GroupNorm in what gets compiled (the UNet, and the
    VAE decoder with compile_vae), never eagerly unless asked."""
    from customcrafter import fusions
    from customcrafter.performance import SpeedConfig, _layer_rewrites

    pipe = _tiny_pipeline()
    _layer_rewrites(pipe, SpeedConfig(compile=compile_mode))
    compiled = compile_mode == "full"
    for part in (pipe.unet, pipe.vae.decoder):
        assert any(isinstance(m, fusions.SubpixelUpsample2D) for m in part.modules())
        norms = [m for m in part.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and all(isinstance(m, fusions.ChannelStatsGroupNorm) == compiled for m in norms)
    assert not any(isinstance(m, fusions.ChannelStatsGroupNorm) for m in pipe.vae.encoder.modules())
    biased = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert biased and all(isinstance(m, fusions.UnfusedBiasLinear) == compiled for m in biased)
    assert not any(isinstance(m, fusions.UnfusedBiasLinear) for m in pipe.unet.modules()
                   if isinstance(m, torch.nn.Linear) and m.bias is None)
    from diffusers.models.activations import GEGLU

    gegl = [m for m in pipe.unet.modules() if isinstance(m, GEGLU)]
    assert gegl and all(isinstance(m, fusions.FusedGEGLU) for m in gegl)  # whatever the mode (SpeedConfig default)

    pipe = _tiny_pipeline()
    _layer_rewrites(pipe, SpeedConfig(compile=compile_mode, subpixel_upsample=False, channel_stats_group_norm=True))
    assert not any(isinstance(m, fusions.SubpixelUpsample2D) for m in pipe.unet.modules())
    assert all(isinstance(m, fusions.ChannelStatsGroupNorm) for m in pipe.unet.modules()
               if isinstance(m, torch.nn.GroupNorm))


def test_fused_geglu_dispatch_keeps_the_function_and_sends_only_eligible_layers_to_the_kernel(monkeypatch):
    """On the CPU every GEGLU keeps its own path (same output, bit for bit). With the kernel declared available, the
    layers with K <= FUSED_GEGLU_MAX_K go to it with their projection's weight and bias, the others (large K, a
    projection wrapped by an adapter) keep their own path."""
    from diffusers.models.activations import GEGLU
    from peft import LoraConfig, get_peft_model

    from customcrafter import fusions, kernels

    torch.manual_seed(0)
    small, large = GEGLU(320, 64).double(), GEGLU(fusions.FUSED_GEGLU_MAX_K + 8, 64).double()
    x_small, x_large = torch.randn(2, 5, 320, dtype=torch.float64), torch.randn(2, 5, 648, dtype=torch.float64)
    with torch.no_grad():
        before = small(x_small), large(x_large)
        assert fusions.use_fused_geglu(torch.nn.ModuleList([small, large])) == 2
        assert torch.equal(small(x_small), before[0]) and torch.equal(large(x_large), before[1])
        torch.testing.assert_close(kernels.geglu(x_small, small.proj.weight, small.proj.bias), before[0])

        calls = []
        monkeypatch.setattr(fusions, "geglu_supported", lambda *a: True)
        monkeypatch.setattr(fusions, "geglu", lambda x, w, b: calls.append((w, b)) or kernels.geglu_reference(x, w, b))
        torch.testing.assert_close(small(x_small), before[0])
        assert len(calls) == 1 and calls[0][0] is small.proj.weight and calls[0][1] is small.proj.bias
        assert torch.equal(large(x_large), before[1]) and len(calls) == 1  # K > FUSED_GEGLU_MAX_K: own path

        wrapped = get_peft_model(torch.nn.Sequential(small), LoraConfig(r=2, target_modules=["0.proj"],
                                                                        init_lora_weights=False))
        lora_out = wrapped(x_small)
        assert len(calls) == 1 and (lora_out - before[0]).abs().max() > 1e-3  # the adapter's update is not lost


def test_geglu_kernels_gelu_polynomial_rounds_to_bf16_as_the_exact_gelu():
    """The GEGLU kernel's GELU (``kernels.gelu_polynomial``, the kernel's float32 evaluation) against the exact erf
    GELU in float64: within 0.35 of a bf16 ulp wherever |GELU| >= 1e-3, within 1.3e-4 absolute elsewhere (the tail
    below -4), over [-60, 60]; and far from what a coarser approximation gives (the tanh form misses by ~4.7e-4)."""
    import math

    from customcrafter import kernels

    x = torch.linspace(-60.0, 60.0, 2_400_001, dtype=torch.float64)
    exact = x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    error = (kernels.gelu_polynomial(x.float()).double() - exact).abs()
    bf16_ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    visible = exact.abs() >= 1e-3
    assert (error / bf16_ulp)[visible].max() < 0.35
    assert error[~visible].max() < 1.3e-4
    assert kernels.gelu_polynomial(torch.tensor([-1e4, 0.0, 1e4])).tolist() == [pytest.approx(0.0, abs=1.3e-4), 0.0,
                                                                                  1e4]
    tanh_form = torch.nn.functional.gelu(x, approximate="tanh")
    assert (tanh_form - exact).abs().max() > 3 * error.max()


# (compute capability, shared memory per block as Triton counts it) -> (temporal attention and GroupNorm kernels,
# GEGLU kernel)
CARDS = {
    "H100": ((9, 0), 232448, True, True),
    "B200": ((10, 0), 232448, True, True),
    "A100": ((8, 0), 166912, True, False),
    "RTX 4090 (24 GB)": ((8, 9), 101376, True, False),
    "RTX 5090": ((12, 0), 101376, True, False),
    "T4": ((7, 5), 65536, False, False),
}


@pytest.fixture
def fresh_device_checks():
    """The device checks are cached per device index: each test's stand-in card starts from an empty cache, and
    leaves none behind."""
    from customcrafter import kernels

    kernels._device_runs.cache_clear()
    yield
    kernels._device_runs.cache_clear()


@pytest.mark.usefixtures("fresh_device_checks")
@pytest.mark.parametrize("card", list(CARDS))
def test_kernels_run_only_on_cards_that_can_launch_them(monkeypatch, card):
    """The GEGLU kernel needs device-side TMA and ~176 KiB of shared memory per block: on a consumer 24 GB card or an
    A100 it could not launch, so those keep cuBLAS + the gating pass; the other kernels need Ampere or newer. The
    support checks ask the tensor's own device (fake CUDA tensors here: no GPU on this machine)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from customcrafter import kernels

    capability, shared_memory, runs_triton, runs_geglu = CARDS[card]
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    monkeypatch.setattr(kernels, "_max_shared_memory", lambda index: shared_memory)
    assert kernels._runs_triton_kernels(0) is runs_triton and kernels._runs_geglu_kernel(0) is runs_geglu
    with FakeTensorMode():
        q = torch.empty(64, 16, 320, device="cuda", dtype=torch.bfloat16)
        weight = torch.empty(2560, 320, device="cuda", dtype=torch.bfloat16)
        bias = torch.empty(2560, device="cuda", dtype=torch.bfloat16)
        assert kernels.temporal_attention_supported(q, q, q, heads=5) is runs_triton
        assert kernels.geglu_supported(q, weight, bias) is runs_geglu


@pytest.mark.usefixtures("fresh_device_checks")
def test_device_checks_are_constants_to_torch_compile(monkeypatch):
    """Read once at trace time: the compiled UNet keeps one graph (a graph break around every feed-forward cost
    ~10 % per step in session 11) and the compiled code asks the device nothing. Eager calls ask once per device."""
    from customcrafter import kernels

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or (9, 0))
    monkeypatch.setattr(kernels, "_max_shared_memory", lambda index: 232448)

    def layer(x):
        x = x + 1
        return x * 2 if kernels._runs_geglu_kernel(0) and kernels._runs_triton_kernels(0) else x - 2

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(8)
    torch.testing.assert_close(compiled(x), (x + 1) * 2)
    assert asked == [0]  # both checks, one question to the device
    compiled(torch.randn(8))
    assert kernels._runs_geglu_kernel(0) and kernels._runs_triton_kernels(0)
    assert asked == [0]
