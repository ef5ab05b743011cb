"""The Triton kernels (``customcrafter.kernels``: temporal attention, the GEGLU gate GEMM) on a GPU (opt-in:
``pytest -m gpu``; CI has no GPU).

Each is checked against its PyTorch formulation computed in float64, on fresh random inputs, with the output
poisoned first so that an unwritten element fails; eagerly and inside ``torch.compile``.
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
                   (9, 64, 2, 128), (40, 16, 4, 16)]


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


def test_kernel_runs_inside_torch_compile():
    """Compiled with the projections around it (inductor calls the kernel itself) it computes the same function."""
    from customcrafter import kernels

    def block(x, weight):
        q, k, v = torch.nn.functional.linear(x, weight).chunk(3, dim=-1)
        return kernels.temporal_attention(q, k, v, 5) * 2

    x = torch.randn(640, 16, 320, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(960, 320, device="cuda", dtype=torch.bfloat16) * 320 ** -0.5
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    with torch.no_grad():
        out = compiled(x, weight)
    q, k, v = torch.nn.functional.linear(x.double(), weight.double()).chunk(3, dim=-1)
    assert _rel(out, kernels.temporal_attention_reference(q, k, v, 5) * 2) < 1e-2


def test_triton_processor_in_a_unet_is_as_accurate_as_sdpa(monkeypatch):
    """The tiny UNet in bf16 with the Triton temporal processor is as close to the float32 UNet as the same bf16
    UNet on SDPA (a random UNet amplifies bf16 rounding, so both are compared with the float32 reference)."""
    from customcrafter import kernels
    from customcrafter.loading import load_base_pipeline
    from customcrafter.performance import _set_sdpa, set_temporal_attention

    calls = []  # the support check's answer for every call into the kernel module
    supported = kernels.temporal_attention_supported
    monkeypatch.setattr(kernels, "temporal_attention_supported", lambda *a: calls.append(supported(*a)) or calls[-1])
    unet = load_base_pipeline("tiny").unet.cuda()
    _set_sdpa(unet)
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, 16, device="cuda")
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda")
    t = torch.tensor([10, 700], device="cuda")
    with torch.no_grad():
        reference = unet(sample, t, context, fps=16).sample
        unet.to(torch.bfloat16)
        args = (sample.bfloat16(), t, context.bfloat16())
        sdpa = unet(*args, fps=16).sample
        layers = set_temporal_attention(unet, "triton")
        triton = unet(*args, fps=16).sample
    assert len(calls) == layers > 0 and all(calls)  # every temporal layer went through the kernel
    err_sdpa, err_triton = _rel(sdpa, reference), _rel(triton, reference)
    assert err_triton < 1.5 * err_sdpa + 1e-3, (err_triton, err_sdpa)


# (name, M tokens, K, N): the spatial transformers' GEGLU at each UNet level (16 frames x CFG batch 2)
GEGLU_SHAPES = [("L0", 81920, 320, 1280), ("L1", 20480, 640, 2560), ("L2", 5120, 1280, 5120)]


def _geglu_inputs(lead, k, n, dtype=torch.bfloat16, bias=True):
    """x, the (2N, K) GEGLU weight and bias, and the kernel's arguments: the gate half, its bias, the value half as
    the cuBLAS matmul the product computes, its bias."""
    x = torch.randn(*lead, k, device="cuda", dtype=dtype)
    w = torch.randn(2 * n, k, device="cuda", dtype=dtype) * k ** -0.5
    b = torch.randn(2 * n, device="cuda", dtype=dtype) * 0.1 if bias else None
    args = (x, w[n:], None if b is None else b[n:], x @ w[:n].t(), None if b is None else b[:n])
    return x, w, b, args


def _geglu64(x, w, b):
    """diffusers' GEGLU in float64: ``h * gelu(gate)`` of the 2N-wide projection."""
    h, gate = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()).chunk(2, dim=-1)
    return h * torch.nn.functional.gelu(gate)


@pytest.mark.parametrize("shape", GEGLU_SHAPES, ids=[s[0] for s in GEGLU_SHAPES])
def test_gated_gelu_linear_matches_float64_geglu(shape, monkeypatch):
    from customcrafter import kernels

    _name, m, k, n = shape
    x, w, b, args = _geglu_inputs((m,), k, n)
    assert kernels.gated_gelu_linear_supported(*args)
    _poison_empty(monkeypatch)
    out = kernels.gated_gelu_linear(*args)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert not out.isnan().any()
    assert _rel(out, _geglu64(x, w, b)) < 1e-2  # bf16 value and output roundings: ~3e-3 expected


# (leading dims, K, N, dtype, biases): ragged M and N with K not a multiple of the K tile, fp16, no biases,
# x with leading dims
GEGLU_CASES = [((1000,), 48, 80, torch.bfloat16, True), ((1000,), 48, 80, torch.float16, True),
               ((777,), 320, 1280, torch.float16, True), ((1000,), 48, 80, torch.bfloat16, False),
               ((777,), 640, 2560, torch.bfloat16, False), ((2, 16, 40), 320, 1280, torch.bfloat16, True),
               ((2, 16, 40), 48, 80, torch.float16, False)]


@pytest.mark.parametrize("case", GEGLU_CASES)
def test_gated_gelu_linear_ragged_shapes_dtypes_and_leading_dims(case, monkeypatch):
    from customcrafter import kernels

    lead, k, n, dtype, bias = case
    x, w, b, args = _geglu_inputs(lead, k, n, dtype, bias)
    assert kernels.gated_gelu_linear_supported(*args)
    _poison_empty(monkeypatch)
    out = kernels.gated_gelu_linear(*args)
    assert out.shape == (*lead, n) and out.dtype == dtype
    assert not out.isnan().any()
    assert _rel(out, _geglu64(x, w, b)) < 1e-2


def test_gated_gelu_linear_reads_strided_rows():
    """x and the value half as column slices of wider tensors (rows strided) give the same result."""
    from customcrafter import kernels

    m, k, n = 3000, 320, 1280
    x = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)[:, k:]
    w = torch.randn(2 * n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    value = torch.empty(m, 3 * n, device="cuda", dtype=torch.bfloat16)[:, n:2 * n]
    value.copy_(x @ w[:n].t())
    args = (x, w[n:], None, value, None)
    assert x.stride(0) == 2 * k and value.stride(0) == 3 * n and kernels.gated_gelu_linear_supported(*args)
    assert _rel(kernels.gated_gelu_linear(*args), _geglu64(x, w, None)) < 1e-2


def test_gated_gelu_linear_runs_inside_torch_compile():
    """Compiled with the value matmul around it (inductor calls the kernel itself), x with leading dims."""
    from customcrafter import kernels

    n = 1280
    x, w, b, args = _geglu_inputs((2, 16, 40), 320, n)
    assert kernels.gated_gelu_linear_supported(*args)

    def geglu(x, w, b):
        return kernels.gated_gelu_linear(x, w[n:], b[n:], x @ w[:n].t(), b[:n]) * 2

    compiled = torch.compile(geglu, fullgraph=True, dynamic=False)
    with torch.no_grad():
        out = compiled(x, w, b)
    assert out.shape == (2, 16, 40, n)
    assert _rel(out, _geglu64(x, w, b) * 2) < 1e-2


def test_gated_gelu_linear_falls_back_where_the_kernel_does_not_apply():
    """CPU tensors, float32, a needed gradient, K not a multiple of 16: the PyTorch formulation, exactly."""
    from customcrafter import kernels

    def check(args):
        assert not kernels.gated_gelu_linear_supported(*args)
        out = kernels.gated_gelu_linear(*args)
        assert torch.equal(out, kernels.gated_gelu_linear_reference(*args))
        return out

    check(tuple(t.cpu() for t in _geglu_inputs((100,), 64, 32)[3]))  # bf16 on the CPU
    check(_geglu_inputs((100,), 64, 32, torch.float32)[3])
    check(_geglu_inputs((100,), 40, 32)[3])  # K % 16 != 0
    x, w, b, _ = _geglu_inputs((100,), 64, 32)
    w.requires_grad_(True)
    out = check((x, w[32:], b[32:], x @ w[:32].t(), b[:32]))
    out.float().sum().backward()  # through PyTorch, so it has a backward
    assert w.grad is not None
