"""The Triton kernels (``customcrafter.kernels``) on a GPU (opt-in: ``pytest -m gpu``; CI has no GPU).

Each kernel is checked against its PyTorch formulation computed in float64, on fresh random inputs, with the
output poisoned first so that an unwritten element fails; eagerly and inside ``torch.compile``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device")
    from customcrafter import kernels

    if not kernels.HAS_TRITON:
        pytest.fail("the gpu marker needs Triton")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _poison_empty(monkeypatch):
    """Make ``torch.empty`` return NaN-filled tensors, so elements a kernel fails to write stay NaN."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)


# (sequences, frames, heads, head_dim): the UNet's levels, a ragged tail of sequences, training's 4 frames,
# a frame count that is no power of two, and the kernel's longest sequence
TEMPORAL_SHAPES = [(2 * 2560, 16, 5, 64), (2 * 160, 16, 20, 64), (37, 16, 2, 64), (96, 4, 5, 64), (50, 12, 3, 32),
                   (9, 64, 2, 128)]


@pytest.mark.parametrize("shape", TEMPORAL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_temporal_attention_kernel_matches_float64_attention(shape, dtype, monkeypatch):
    from customcrafter import kernels

    b, s, h, d = shape
    q, k, v = (torch.randn(b, s, h * d, device="cuda", dtype=dtype) for _ in range(3))
    assert kernels.temporal_attention_supported(q, k, v, h)
    _poison_empty(monkeypatch)
    out = kernels.temporal_attention(q, k, v, h)
    reference = kernels.temporal_attention_reference(q.double(), k.double(), v.double(), h)
    assert out.shape == q.shape and out.dtype == dtype
    assert not out.isnan().any()
    assert _rel(out, reference) < 1e-2  # bf16 operands: ~3e-3 expected


def test_temporal_attention_kernel_reads_strided_projections():
    """q, k and v as column slices of one fused projection (rows strided by 3 x channels) give the same result."""
    from customcrafter import kernels

    qkv = torch.randn(300, 16, 3 * 320, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.chunk(3, dim=-1)
    assert kernels.temporal_attention_supported(q, k, v, 5)
    out = kernels.temporal_attention(q, k, v, 5)
    assert _rel(out, kernels.temporal_attention_reference(q.double(), k.double(), v.double(), 5)) < 1e-2


def test_temporal_attention_falls_back_where_the_kernel_does_not_apply():
    from customcrafter import kernels

    q = torch.randn(8, 16, 320, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert not kernels.temporal_attention_supported(q, q, q, 5)  # a gradient is needed
    long = torch.randn(2, 80, 128, device="cuda", dtype=torch.bfloat16)
    assert not kernels.temporal_attention_supported(long, long, long, 2)  # longer than 64
    out = kernels.temporal_attention(q, q, q, 5)
    out.float().sum().backward()  # through PyTorch, so it has a backward
    assert q.grad is not None


# (tokens, in, out): the UNet's three levels' feed-forward input projections and a ragged, bias-free case
GEGLU_SHAPES = [(81920, 320, 1280, True), (20480, 640, 2560, True), (5120, 1280, 5120, True), (1000, 96, 200, False)]


@pytest.mark.parametrize("shape", GEGLU_SHAPES)
def test_geglu_kernel_matches_float64_geglu(shape, monkeypatch):
    from customcrafter import kernels

    m, k, n, has_bias = shape
    x = torch.randn(2, m // 2, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(2 * n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    bias = torch.randn(2 * n, device="cuda", dtype=torch.bfloat16) if has_bias else None
    assert kernels.geglu_supported(x, weight, bias)
    _poison_empty(monkeypatch)
    out = kernels.geglu(x, weight, bias)
    reference = kernels.geglu_reference(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.shape == (2, m // 2, n) and not out.isnan().any()
    assert _rel(out, reference) < 1e-2


def test_kernels_run_inside_torch_compile():
    from customcrafter import kernels

    def block(x, weight, bias, heads):
        return kernels.geglu(kernels.temporal_attention(x, x, x, heads), weight, bias)

    x = torch.randn(64, 16, 320, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(2560, 320, device="cuda", dtype=torch.bfloat16) * 320 ** -0.5
    bias = torch.randn(2560, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, weight, bias, 5), block(x, weight, bias, 5), rtol=0, atol=0)


def test_processors_in_a_unet_match_the_sdpa_path():
    """The whole tiny UNet with the Triton temporal processor and fused GEGLU against the same UNet on SDPA."""
    from customcrafter.loading import load_base_pipeline
    from customcrafter.performance import _set_sdpa, set_temporal_attention, use_fused_geglu

    unet = load_base_pipeline("tiny").unet.cuda().to(torch.bfloat16)
    _set_sdpa(unet)
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, 16, device="cuda", dtype=torch.bfloat16)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([10, 700], device="cuda")
    with torch.no_grad():
        before = unet(sample, t, context, fps=16).sample
        assert set_temporal_attention(unet, "triton") > 0 and use_fused_geglu(unet) > 0
        after = unet(sample, t, context, fps=16).sample
    assert _rel(after, before) < 2e-2
