"""The Triton kernels (``customcrafter.kernels``: temporal attention, GroupNorm's scale and shift, GEGLU) on a GPU (opt-in: ``pytest -m gpu``; CI has no
GPU).

It is checked against its PyTorch formulation computed in float64, on fresh random inputs, with the output
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

    long = torch.randn(2, 80, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert not kernels.temporal_attention_supported(long, long, long, 2)  # longer than 64
    out = kernels.temporal_attention(long, long, long, 2)
    out.float().sum().backward()  # through PyTorch
    assert long.grad is not None
    fp32 = torch.randn(8, 16, 320, device="cuda")
    assert not kernels.temporal_attention_supported(fp32, fp32, fp32, 5)


def _attention_grads(q, k, v, heads, grad_out, attention):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    attention(q, k, v, heads).backward(grad_out)
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("shape", TEMPORAL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_temporal_attention_backward_matches_float64_attention(shape, dtype, monkeypatch):
    """The backward kernel's q, k and v gradients against PyTorch's autograd through float64 attention."""
    from customcrafter import kernels

    b, s, h, d = shape
    q, k, v = (torch.randn(b, s, h * d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(b, s, h * d, device="cuda", dtype=dtype)
    assert kernels.temporal_attention_supported(q, k, v, h)  # with gradients
    _poison_empty(monkeypatch)
    grads = _attention_grads(q, k, v, h, grad_out, kernels.temporal_attention)
    expected = _attention_grads(q.double(), k.double(), v.double(), h, grad_out.double(),
                                    kernels.temporal_attention_reference)
    for name, grad, reference in zip("qkv", grads, expected, strict=True):
        assert grad.shape == q.shape and grad.dtype == dtype, name
        assert not grad.isnan().any(), name
        assert _rel(grad, reference) < 2e-2, (name, _rel(grad, reference))  # bf16 operands: ~5e-3 expected


def test_temporal_attention_backward_is_as_accurate_as_sdpa():
    """At the UNet's level-0 shape the kernel's gradients are as close to float64 as SDPA's in the same dtype."""
    from customcrafter import kernels

    q, k, v = (torch.randn(2 * 2560, 16, 320, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    grad_out = torch.randn_like(q)
    grads = _attention_grads(q, k, v, 5, grad_out, kernels.temporal_attention)
    sdpa = _attention_grads(q, k, v, 5, grad_out, kernels.temporal_attention_reference)
    expected = _attention_grads(q.double(), k.double(), v.double(), 5, grad_out.double(),
                                    kernels.temporal_attention_reference)
    for name, grad, theirs, reference in zip("qkv", grads, sdpa, expected, strict=True):
        ours, sdpa_error = _rel(grad, reference), _rel(theirs, reference)
        assert ours < 1.5 * sdpa_error + 1e-3, (name, ours, sdpa_error)


def test_temporal_attention_backward_inside_torch_compile():
    """Compiled with a fused projection in front (strided q/k/v, as the UNet's), forward and backward through the
    kernels give the float64 gradients of the projection's input and weight."""
    from customcrafter import kernels

    def block(x, weight):
        q, k, v = torch.nn.functional.linear(x, weight).chunk(3, dim=-1)
        return kernels.temporal_attention(q, k, v, 5) * 2

    x = torch.randn(640, 16, 320, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(960, 320, device="cuda", dtype=torch.bfloat16) * 320 ** -0.5).requires_grad_(True)
    grad_out = torch.randn(640, 16, 320, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    compiled(x, weight).backward(grad_out)
    x64, w64 = x.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    q, k, v = torch.nn.functional.linear(x64, w64).chunk(3, dim=-1)
    (kernels.temporal_attention_reference(q, k, v, 5) * 2).backward(grad_out.double())
    assert _rel(x.grad, x64.grad) < 2e-2 and _rel(weight.grad, w64.grad) < 2e-2


def test_torch_sees_each_kernel_write_only_its_outputs():
    """torch's mutation analysis of a user Triton kernel decides whether compiled code copies its inputs before each
    call (a kernel taken to write q, k and v gets three copies per call; session 10 measured that cost). A shared
    @triton.jit helper between the temporal forward and backward kernels made the analysis mark q, k and v written.
    Every kernel of ``customcrafter.kernels`` must be taken to write its outputs and nothing else."""
    from torch._higher_order_ops.triton_kernel_wrap import get_mutated_tensors, kernel_side_table

    from customcrafter import kernels

    def written(kernel, tensors, constants):
        return sorted(get_mutated_tensors(kernel_side_table.add_kernel(kernel),
                                          kernel_side_table.add_constant_args(constants), tensors, {}))

    b, s, h, d = 64, 16, 5, 64
    rows = {"n_rows": b * s, "SEQ": s, "HEAD_DIM": d, "BLOCK_R": 64, "QK_SCALE": 0.18}

    def tensors(*names):
        return {name: torch.empty(b, s, h * d, device="cuda", dtype=torch.bfloat16) for name in names}

    forward = written(kernels._temporal_attention_kernel, tensors("q_ptr", "k_ptr", "v_ptr", "o_ptr"),
                      rows | {f"stride_{x}": h * d for x in "qkvo"})
    backward = written(kernels._temporal_attention_backward_kernel,
                       tensors("q_ptr", "k_ptr", "v_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"),
                       rows | {f"stride_{x}": h * d for x in ("q", "k", "v", "do", "grad")} | {"SM_SCALE": 0.125})
    assert forward == ["o_ptr"]
    assert backward == ["dk_ptr", "dq_ptr", "dv_ptr"]
    n, c = 32, 320
    stats = {name: torch.empty(n, c, device="cuda") for name in ("mean_ptr", "var_ptr", "scale_ptr", "shift_ptr")}
    params = {name: torch.empty(c, device="cuda") for name in ("weight_ptr", "bias_ptr")}
    assert written(kernels._group_norm_scale_shift_kernel, stats | params,
                   {"channels": c, "eps": 1e-6, "PER_GROUP": 10, "BLOCK": 16}) == ["scale_ptr", "shift_ptr"]
    m, k, half = 4096, 320, 1280
    geglu = {"x_ptr": (m, k), "w_ptr": (2 * half, k), "b_ptr": (2 * half,), "o_ptr": (m, half)}
    assert written(kernels._geglu_kernel,
                   {name: torch.empty(shape, device="cuda", dtype=torch.bfloat16) for name, shape in geglu.items()},
                   {"M": m, "N": half, "K": k, "stride_xm": k, "PROGRAMS": 132, "BN": 128, "BM": 128, "BK": 64,
                    "GROUP_M": 8}) == ["o_ptr"]


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


# (samples, channels, groups): UNet levels (CFG batch 2), the VAE decoder's 128 channels, a group size that is no
# power of two and one of a single channel
GROUP_NORM_STATS = [(2, 320, 32), (2, 1280, 32), (1, 128, 32), (3, 96, 32), (2, 60, 4), (2, 32, 32)]


@pytest.mark.parametrize("shape", GROUP_NORM_STATS)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_scale_shift_kernel_matches_float64(shape, affine, monkeypatch):
    from customcrafter import kernels

    _poison_empty(monkeypatch)
    n, c, groups = shape
    mean_c = torch.randn(n, c, device="cuda") * 3 + 1
    var_c = torch.rand(n, c, device="cuda") * 2 + 0.05
    weight = (torch.rand(c, device="cuda") + 0.5).to(torch.bfloat16) if affine else None
    bias = torch.randn(c, device="cuda").to(torch.bfloat16) if affine else None
    expected = kernels.group_norm_scale_shift_reference(mean_c.double(), var_c.double(), weight, bias, groups, 1e-6)
    with torch.no_grad():
        scale, shift = kernels.group_norm_scale_shift(mean_c, var_c, weight, bias, groups, 1e-6)
        direct = torch.ops.customcrafter.group_norm_scale_shift(
            mean_c, var_c, weight if affine else torch.ones(c, device="cuda"),
            bias if affine else torch.zeros(c, device="cuda"), groups, 1e-6)
    for out, ref in zip((scale, shift), expected, strict=True):
        assert out.dtype == torch.float32 and out.shape == (n, c)
        assert torch.isfinite(out).all()
        assert _rel(out, ref) < 1e-6
    torch.testing.assert_close(direct[0], scale, rtol=0, atol=0)
    torch.testing.assert_close(direct[1], shift, rtol=0, atol=0)


def test_group_norm_scale_shift_falls_back_with_gradients_and_on_cpu():
    from customcrafter import kernels

    mean_c = torch.randn(2, 64, device="cuda", requires_grad=True)
    var_c = torch.rand(2, 64, device="cuda") + 0.1
    scale, shift = kernels.group_norm_scale_shift(mean_c, var_c, None, None, 8, 1e-5)
    (scale.sum() + shift.sum()).backward()  # the PyTorch formulation: it has a gradient
    assert mean_c.grad is not None and torch.isfinite(mean_c.grad).all()
    cpu = kernels.group_norm_scale_shift(mean_c.detach().cpu(), var_c.cpu(), None, None, 8, 1e-5)
    torch.testing.assert_close(cpu[0], scale.detach().cpu())


@pytest.fixture
def geglu_card():
    """The GEGLU kernel's tests need a card that launches it (device-side TMA, 176 KiB of shared memory per block:
    Hopper-class). On other cards the layers take the PyTorch path, which ``test_geglu_falls_back...`` covers."""
    from customcrafter import kernels

    if not kernels._runs_geglu_kernel(torch.cuda.current_device()):
        pytest.skip(f"{torch.cuda.get_device_name()} cannot launch the GEGLU kernel (kernels._runs_geglu_kernel)")


# (M, K, N): the UNet's level-0 and level-1 feed-forwards (CFG batch 2 x 16 frames), a row count that is no multiple of
# the 128-row tile, K that is no multiple of the 64-wide K tile, and level 2's K
GEGLU_SHAPES = [(81920, 320, 1280), (20480, 640, 2560), (1000, 320, 1280), (333, 200, 256), (5120, 1280, 5120)]


def _geglu_inputs(m, k, n, dtype=torch.bfloat16):
    x = torch.randn(m, k, device="cuda").to(dtype)
    weight = (torch.randn(2 * n, k, device="cuda") * k ** -0.5).to(dtype)
    bias = (torch.randn(2 * n, device="cuda") * 0.1).to(dtype)
    return x, weight, bias


@pytest.mark.usefixtures("geglu_card")
@pytest.mark.parametrize("shape", GEGLU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_geglu_kernel_matches_float64_and_beats_the_path_it_replaces(shape, dtype, monkeypatch):
    from customcrafter import kernels

    m, k, n = shape
    x, weight, bias = _geglu_inputs(m, k, n, dtype)
    assert kernels.geglu_supported(x, weight, bias)
    exact = kernels.geglu_reference(x.double(), weight.double(), bias.double())
    with torch.no_grad():
        replaced = kernels.geglu_reference(x, weight, bias)  # cuBLAS + PyTorch's gating in the same dtype
        _poison_empty(monkeypatch)
        out = kernels.geglu(x, weight, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    assert not out.isnan().any()
    assert _rel(out, exact) < 5e-3  # one rounding of the output: ~1.7e-3 in bf16
    assert _rel(out, exact) <= _rel(replaced, exact) * 1.05


@pytest.mark.usefixtures("geglu_card")
def test_geglu_kernels_gelu_is_the_exact_gelu_to_bf16_rounding(monkeypatch):
    """The kernel's epilogue GELU alone (value half 0 with bias 1, gate half the identity, so the output is
    gelu(x)): against float64's erf GELU, within one bf16 ulp wherever |GELU| >= 1e-3 (polynomial 0.33 ulp + the
    output's rounding) and within 1.3e-4 + the output's rounding elsewhere, for every bf16 value in [-64, 64]."""
    from customcrafter import kernels

    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    values = values[values.isfinite() & (values.abs() <= 64)].unique()
    x = torch.nn.functional.pad(values, (0, (-values.numel()) % 128)).view(-1, 128).to("cuda", torch.bfloat16)
    weight = torch.cat([torch.zeros(128, 128), torch.eye(128)]).to("cuda", torch.bfloat16)
    bias = torch.cat([torch.ones(128), torch.zeros(128)]).to("cuda", torch.bfloat16)
    assert kernels.geglu_supported(x, weight, bias)
    with torch.no_grad():
        _poison_empty(monkeypatch)
        out = kernels.geglu(x, weight, bias).double()
    exact = torch.nn.functional.gelu(x.double())
    error = (out - exact).abs()
    bf16_ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    visible = exact.abs() >= 1e-3
    assert (error / bf16_ulp)[visible].max() <= 1.0
    assert error[~visible].max() <= 1.3e-4 + 2**-17


@pytest.mark.usefixtures("geglu_card")
def test_geglu_kernel_takes_batched_and_strided_rows():
    """(batch, tokens, K) inputs as the transformer blocks pass them, rows that are a slice of wider rows (read in
    place, no copy) and rows that start at an address TMA cannot read from (copied first) give the same result as
    the contiguous rows."""
    from customcrafter import kernels

    x, weight, bias = _geglu_inputs(2 * 640, 320, 1280)
    wide = torch.zeros(2 * 640, 384, device="cuda", dtype=x.dtype)
    wide[:, 32:352] = x
    with torch.no_grad():
        flat = kernels.geglu(x, weight, bias)
        batched = kernels.geglu(x.view(2, 640, 320), weight, bias)
        strided = kernels.geglu(wide[:, 32:352], weight, bias)
        shifted = torch.empty(x.numel() + 1, device="cuda", dtype=x.dtype)
        shifted[1:] = x.flatten()
        misaligned = kernels.geglu(shifted[1:].view_as(x), weight, bias)
    assert batched.shape == (2, 640, 1280)
    assert torch.equal(batched.view(-1, 1280), flat) and torch.equal(strided, flat) and torch.equal(misaligned, flat)


def test_geglu_falls_back_where_the_kernel_does_not_apply():
    from customcrafter import kernels

    x, weight, bias = _geglu_inputs(256, 320, 1280)
    for args in ((x.float(), weight.float(), bias.float()), (x, weight, None), (x, weight[:2 * 1000], bias[:2000]),
                 (x.cpu(), weight.cpu(), bias.cpu())):
        assert not kernels.geglu_supported(*args)
        torch.testing.assert_close(kernels.geglu(*args), kernels.geglu_reference(*args))
    trained = x.clone().requires_grad_()
    assert not kernels.geglu_supported(trained, weight, bias)
    kernels.geglu(trained, weight, bias).float().sum().backward()  # the PyTorch path: it has a gradient
    assert trained.grad is not None and torch.isfinite(trained.grad).all()


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.usefixtures("geglu_card")
def test_fused_geglu_feed_forward_inside_torch_compile_and_cuda_graphs(mode):
    """A diffusers FeedForward switched to the fused GEGLU, compiled (inductor calls the kernel; with CUDA graphs
    too), gives the eager kernel's output, which is as close to the float32 layer as the unswitched bf16 layer."""
    from diffusers.models.attention import FeedForward

    from customcrafter import fusions

    torch.manual_seed(0)
    reference = FeedForward(320, activation_fn="geglu").cuda()
    x = torch.randn(2, 2560, 320, device="cuda")
    with torch.no_grad():
        exact = reference.double()(x.double())
        layer = reference.to(torch.bfloat16)
        plain = layer(x.bfloat16())
        assert fusions.use_fused_geglu(layer) == 1
        fused = layer(x.bfloat16())
        compiled = torch.compile(layer, mode=mode, fullgraph=True, dynamic=False)
        outs = [compiled(x.bfloat16()).clone() for _ in range(3)]
    assert all(torch.equal(out, fused) for out in outs)
    assert _rel(fused, exact) <= _rel(plain, exact) * 1.05


def test_flop_counter_counts_the_kernels_as_the_ops_they_replace():
    """``torch.utils.flop_counter`` (the benchmarks' TFLOP/s) sees each kernel as the PyTorch ops it replaces."""
    from torch.utils.flop_counter import FlopCounterMode

    from customcrafter import kernels

    def count(fn, *args) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(*args)
        return counter.get_total_flops()

    x, weight, bias = _geglu_inputs(1000, 320, 1280)
    assert count(kernels.geglu, x, weight, bias) == count(kernels.geglu_reference, x, weight, bias) == 2 * 1000 * 320 * 2560
    q, k, v = (torch.randn(640, 16, 320, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert kernels.temporal_attention_supported(q, k, v, 5)
    assert count(kernels.temporal_attention, q, k, v, 5) == count(kernels.temporal_attention_reference, q, k, v, 5) > 0


def test_this_card_runs_every_kernel_when_it_is_a_hopper():
    """The device checks keep the kernels off cards that cannot launch them; on the H100 (and H200) the benchmarks
    ran on, all of them stay on."""
    from customcrafter import kernels

    index = torch.cuda.current_device()
    assert kernels._runs_triton_kernels(index)
    if torch.cuda.get_device_capability(index) == (9, 0):
        assert kernels._max_shared_memory(index) >= kernels._GEGLU_SHARED_MEMORY
        assert kernels._runs_geglu_kernel(index)
