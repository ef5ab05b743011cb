"""The layer rewrites of ``customcrafter.fusions`` in bf16 on a GPU, eagerly and compiled, at UNet and VAE shapes
(opt-in: ``pytest -m gpu``; CI has no GPU). Each must be as close to the float64 result as the layer it replaces
is in bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("shapes", [[(32, 320, 40, 64)], [(2, 320, 16, 40, 64)], [(32, 640, 40, 64), (32, 320, 40, 64)],
                                    [(8, 128, 80, 128)]], ids=["resnet-L0", "temporal-L0", "up-cat-L0", "vae"])
def test_channel_stats_group_norm_in_bf16(shapes, compiled):
    from customcrafter.fusions import channel_stats_group_norm

    torch.manual_seed(0)
    fmt = torch.channels_last if len(shapes[0]) == 4 else torch.channels_last_3d
    parts = [(torch.randn(s, device="cuda") * 3 + 1).to(torch.bfloat16).contiguous(memory_format=fmt) for s in shapes]
    channels = sum(s[1] for s in shapes)
    weight = (torch.rand(channels, device="cuda") + 0.5).to(torch.bfloat16)
    bias = torch.randn(channels, device="cuda").to(torch.bfloat16)

    def ours(*xs):
        return F.silu(channel_stats_group_norm(torch.cat(xs, dim=1), 32, weight, bias, 1e-6))

    def native(*xs):
        return F.silu(F.group_norm(torch.cat(xs, dim=1), 32, weight, bias, 1e-6))

    with torch.no_grad():
        expected = F.silu(F.group_norm(torch.cat([p.double() for p in parts], dim=1), 32, weight.double(),
                                       bias.double(), 1e-6))
        fn = torch.compile(ours, dynamic=False) if compiled else ours
        out = fn(*parts)
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    assert _rel(out, expected) <= 1.1 * _rel(native(*parts), expected) + 1e-4


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("shape", [(32, 640, 20, 32), (8, 256, 160, 256)], ids=["unet-L1-L0", "vae-last"])
def test_subpixel_upsample_conv_in_bf16(shape, compiled):
    from customcrafter.fusions import subpixel_upsample_conv

    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(shape[1], shape[1], 3, padding=1, device="cuda").to(torch.bfloat16).to(
        memory_format=torch.channels_last)
    with torch.no_grad():
        expected = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), conv.weight.double(),
                            conv.bias.double(), padding=1)
        plain = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        fn = torch.compile(subpixel_upsample_conv, dynamic=False) if compiled else subpixel_upsample_conv
        out = fn(x, conv.weight, conv.bias)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # the summed 2x2 weights are rounded to bf16 once more: allow a little over the plain layer's error
    assert _rel(out, expected) <= 1.5 * _rel(plain, expected)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("shape", [(81920, 320, 320), (81920, 1280, 320), (5120, 1280, 1280)],
                         ids=["out-proj-L0", "ff-out-L0", "out-proj-L2"])
def test_unfused_bias_linear_in_bf16(shape, compiled):
    """The matmul rounded to bf16 before its bias add (one more rounding than cuBLAS's epilogue) stays as close to
    float64 as the fused linear layer, followed by a residual add as in the UNet."""
    from customcrafter.fusions import unfused_bias_linear

    torch.manual_seed(0)
    m, k, n = shape
    x, residual = (torch.randn(m, d, device="cuda").to(torch.bfloat16) for d in (k, n))
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)

    def ours(x, residual):
        return unfused_bias_linear(x, weight, bias) + residual

    with torch.no_grad():
        expected = F.linear(x.double(), weight.double(), bias.double()) + residual.double()
        fn = torch.compile(ours, dynamic=False) if compiled else ours
        out = fn(x, residual)
        fused = F.linear(x, weight, bias) + residual
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    assert _rel(out, expected) <= 1.5 * _rel(fused, expected) + 1e-4


@pytest.mark.parametrize("compiled", [False, True])
def test_context_once_per_video_is_as_close_to_float32_as_the_per_frame_context_in_bf16(compiled):
    """``use_video_context_attention`` (the default when compiled: keys and values of the text context once per
    video, each video's frames one query sequence) in a bf16 UNet on CUDA, at the real latent size and with the
    sampler's CFG batch (one latent, the (negative, positive) contexts): as close to the float32 UNet with the context
    repeated per frame as the bf16 UNet with the repeated context is, eagerly and compiled (inductor, cuDNN/flash
    attention over a 16 x 2560-row query)."""
    import copy

    from customcrafter.loading import load_base_pipeline
    from customcrafter.performance import use_video_context_attention

    torch.manual_seed(0)
    unet = load_base_pipeline("tiny", device="cuda").unet.eval()
    x = torch.randn(1, 4, 16, 40, 64, device="cuda")
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda")
    t, fps = torch.full((1,), 500, device="cuda"), torch.full((1,), 16, device="cuda")
    assert not unet.context_per_video
    with torch.no_grad():
        expected = unet(x, t, context, fps=fps, return_dict=False)[0]
        outputs = {}
        for per_video in (False, True):
            model = copy.deepcopy(unet).to(torch.bfloat16)
            if per_video:
                assert use_video_context_attention(model) > 0 and model.context_per_video
            torch._dynamo.reset()
            run = torch.compile(model, dynamic=False) if compiled else model
            outputs[per_video] = run(x.bfloat16(), t, context.bfloat16(), fps=fps, return_dict=False)[0].float()
    per_frame_error = _rel(outputs[False], expected)
    assert 0 < per_frame_error < 5e-2  # bf16 rounding, not another model
    assert _rel(outputs[True], expected) <= 1.5 * per_frame_error + 1e-4


def test_cuda_graph_sampling_equals_compiled_sampling_and_keeps_outputs():
    """``compile_mode="reduce-overhead"`` (CUDA graphs, the default with compile="full"), through graph trees and
    through inductor's plain capture (``cudagraph_trees=False``, whose every call returns the same output tensors),
    samples the same frames as plain compilation, twice in a row, with prompt embeddings kept across calls (a graph
    replay overwrites its previous output: the pipeline and the VAE decode copy what they keep)."""
    from customcrafter.loading import load_base_pipeline
    from customcrafter.performance import SpeedConfig, optimize_pipeline

    videos = {}
    for mode, trees in (("default", True), ("reduce-overhead", True), ("reduce-overhead", False)):
        torch._dynamo.reset()
        pipe = optimize_pipeline(load_base_pipeline("tiny", device="cuda"),
                                 SpeedConfig(compile="full", compile_mode=mode, cudagraph_trees=trees,
                                             decode_chunk_size=2))
        kept = pipe.encode_prompt("a dog")
        pipe.encode_prompt("a cat")  # a second replay of the same text graph
        runs = []
        for seed in (0, 0, 1):
            frames = pipe(prompt_embeds=kept, num_inference_steps=4, guidance_scale=12.0, num_frames=4, height=64,
                          width=64, generator=torch.Generator().manual_seed(seed), output_type="pt",
                          progress=False).frames
            runs.append(frames.float().cpu())
        assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
        videos[mode, trees] = runs
    for graphed in (videos["reduce-overhead", True], videos["reduce-overhead", False]):
        for plain, video in zip(videos["default", True], graphed, strict=True):
            torch.testing.assert_close(video, plain, rtol=0, atol=1e-3)


def test_host_step_noise_on_cuda_is_the_cpu_draws_and_samples_as_given_noise():
    """``HostStepNoise`` on CUDA (a background thread, pinned memory, copies that do not wait): every step's noise is
    the CPU generator's step-by-step draw, and the eager tiny pipeline (η = 1, CPU generator: the path that takes it)
    samples the same latents as with that noise handed over through ``noise_sampler``."""
    from diffusers.utils.torch_utils import randn_tensor

    from customcrafter.loading import load_base_pipeline
    from customcrafter.pipeline import HostStepNoise

    shape, steps = (1, 4, 4, 8, 8), 6
    noise = HostStepNoise(torch.Generator().manual_seed(3), shape, steps, torch.device("cuda"))
    got = [noise(step, shape) for step in range(steps)]
    noise.close()
    reference = torch.Generator().manual_seed(3)
    expected = [randn_tensor(shape, generator=reference, device=torch.device("cpu"), dtype=torch.float32)
                for _ in range(steps)]
    assert all(g.is_cuda and torch.equal(g.cpu(), e) for g, e in zip(got, expected, strict=True))

    pipe = load_base_pipeline("tiny", device="cuda")
    kwargs = dict(prompt="a dog", num_inference_steps=4, guidance_scale=12.0, eta=1.0, num_frames=4, height=64,
                  width=64, output_type="latent", progress=False)
    generator = torch.Generator().manual_seed(0)
    threaded = pipe(generator=generator, **kwargs).frames
    draws = torch.Generator().manual_seed(0)
    latents = randn_tensor((1, 4, 4, 8, 8), generator=draws, device=torch.device("cpu"), dtype=torch.float32)
    step_noise = [randn_tensor((1, 4, 4, 8, 8), generator=draws, device=torch.device("cpu"), dtype=torch.float32)
                  for _ in range(4)]
    given = pipe(latents=latents, noise_sampler=lambda i, shape: step_noise[i], **kwargs).frames
    torch.testing.assert_close(threaded, given, rtol=1e-5, atol=1e-5)  # other noise would differ by O(1)
    assert torch.equal(generator.get_state(), draws.get_state())  # the generator advanced as drawing step by step
