"""Micro-benchmarks of the UNet's hot operations at their real shapes (one H100): which SDPA backend is fastest
for the spatial and temporal attention, and what FP8 (``torch._scaled_mm``, row-wise scales) would buy over bf16
for the linear layers, what our Triton kernel (``customcrafter.kernels``) and the layer rewrites
(``customcrafter.fusions``) buy. Prints one JSON line per shape and writes them all to a JSON file; nothing here
changes the product.

    python benchmarks/micro_ops.py --out micro_ops.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def cuda_time(fn, iters: int = 20) -> float:
    """Mean time in ms over ``iters`` back-to-back calls after 3 warm-up calls (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


# (name, batch, heads, q_len, kv_len, head_dim, layers per forward): 16 frames x CFG batch 2 at 320x512
ATTENTION = [
    ("spatial-self L0", 32, 5, 2560, 2560, 64, 5), ("spatial-cross L0", 32, 5, 2560, 77, 64, 5),
    ("spatial-self L1", 32, 10, 640, 640, 64, 5), ("spatial-cross L1", 32, 10, 640, 77, 64, 5),
    ("spatial-self L2", 32, 20, 160, 160, 64, 5), ("spatial-self L3", 32, 20, 40, 40, 64, 1),
    ("temporal L0", 2 * 2560, 5, 16, 16, 64, 10), ("temporal L1", 2 * 640, 10, 16, 16, 64, 10),
    ("temporal L2", 2 * 160, 20, 16, 16, 64, 10),
]
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}

# (name, M tokens, K, N): spatial transformer projections and feed-forward at each level
LINEAR = [("L0 qkv/out", 81920, 320, 320), ("L0 ff-in (GEGLU)", 81920, 320, 2560), ("L0 ff-out", 81920, 1280, 320),
          ("L1 qkv/out", 20480, 640, 640), ("L1 ff-in", 20480, 640, 5120), ("L1 ff-out", 20480, 2560, 640),
          ("L2 qkv/out", 5120, 1280, 1280), ("L2 ff-in", 5120, 1280, 10240), ("L2 ff-out", 5120, 5120, 1280)]


def attention_rows() -> list[dict]:
    return [attention_row(*shape) for shape in ATTENTION]


def attention_row(name: str, b: int, h: int, lq: int, lk: int, d: int, layers: int) -> dict:
    q = torch.randn(b, h, lq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, h, lk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    row = {"op": name, "layers_per_forward": layers}
    for label, backend in BACKENDS.items():
        try:
            with sdpa_kernel([backend]):
                row[label + "_ms"] = round(cuda_time(lambda: F.scaled_dot_product_attention(q, k, v)), 4)
        except RuntimeError as exc:
            row[label + "_ms"] = None
            row[label + "_error"] = str(exc).splitlines()[0][:120]
    with sdpa_kernel(list(BACKENDS.values())):
        row["default_ms"] = round(cuda_time(lambda: F.scaled_dot_product_attention(q, k, v)), 4)
    print(json.dumps(row), flush=True)
    return row


def temporal_rows() -> list[dict]:
    """Temporal attention from and to the projections' (batch, frames, channels) layout, as the UNet runs it:
    SDPA (with its transposes) per backend, compiled, vs the compiled pointwise formulation; forward and
    forward + backward. (The pointwise formulation was tried as a processor and measured slower; kept here as
    the record.)"""

    def sdpa(q, k, v, heads):
        b, s, c = q.shape
        q, k, v = (t.view(b, s, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, c)

    def pointwise(q, k, v, heads):
        b, s, c = q.shape
        d = c // heads
        q = q.view(b, s, 1, heads, d).float()
        k, v = k.view(b, 1, s, heads, d).float(), v.view(b, 1, s, heads, d).float()
        p = ((q * k).sum(-1) * d ** -0.5).softmax(dim=2)
        return (p.unsqueeze(-1) * v).sum(2).to(torch.bfloat16).reshape(b, s, c)

    return [temporal_row(sdpa, pointwise, *shape) for shape in ATTENTION if shape[0].startswith("temporal")]


def temporal_row(sdpa, pointwise, name: str, b: int, h: int, lq: int, _lk: int, d: int, layers: int) -> dict:
    q, k, v = (torch.randn(b, lq, h * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(b, lq, h * d, device="cuda", dtype=torch.bfloat16)
    row = {"op": name, "layers_per_forward": layers}
    candidates = {"sdpa-" + label: (lambda q, k, v, backend=backend: _with(backend, sdpa, q, k, v, h))
                  for label, backend in BACKENDS.items() if label != "math"}
    candidates["sdpa-default-compiled"] = torch.compile(lambda q, k, v: sdpa(q, k, v, h), dynamic=False)
    candidates["pointwise-compiled"] = torch.compile(lambda q, k, v: pointwise(q, k, v, h), dynamic=False)
    reference = sdpa(q.float(), k.float(), v.float(), h)
    for label, fn in candidates.items():
        try:
            forward = functools.partial(fn, q, k, v)
            with torch.no_grad():
                row[label + "_fwd_ms"] = round(cuda_time(forward), 4)
                out = forward().float()
            row[label + "_rel_err"] = _rel_err(out, reference)
            row[label + "_fwd_bwd_ms"] = round(cuda_time(functools.partial(_backward, forward, grad)), 4)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run these shapes is a finding too
            row[label + "_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    print(json.dumps(row), flush=True)
    return row


def _backward(forward, grad):
    forward().backward(grad)


def _with(backend, fn, *args):
    with sdpa_kernel([backend]):
        return fn(*args)


def linear_rows() -> list[dict]:
    return [linear_row(*shape) for shape in LINEAR]


def _fp8_linear(x, w8, w_scale):
    """Dynamic row-wise activation scale + the scaled matmul, as an FP8 inference path would run."""
    x_scale = x.abs().amax(dim=1, keepdim=True).float() / 448
    x8 = (x / x_scale).to(torch.float8_e4m3fn)
    return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)


def linear_row(name: str, m: int, k: int, n: int) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    flops = 2 * m * k * n
    bf16 = cuda_time(functools.partial(F.linear, x, w))
    row = {"op": name, "bf16_ms": round(bf16, 4), "bf16_tflops": round(flops / bf16 / 1e9, 1)}
    try:
        w_scale = (w.abs().amax(dim=1, keepdim=True) / 448).float()
        w8 = (w / w_scale).to(torch.float8_e4m3fn)
        w_scale = w_scale.t().contiguous()
        x_scale = x.abs().amax(dim=1, keepdim=True).float() / 448
        x8 = (x / x_scale).to(torch.float8_e4m3fn)
        mm_only = cuda_time(functools.partial(torch._scaled_mm, x8, w8.t(), scale_a=x_scale, scale_b=w_scale,
                                              out_dtype=torch.bfloat16))
        with_quant = cuda_time(functools.partial(_fp8_linear, x, w8, w_scale))
        ref = F.linear(x.float(), w.float())
        err = ((_fp8_linear(x, w8, w_scale).float() - ref).norm() / ref.norm()).item()
        err_bf16 = ((F.linear(x, w).float() - ref).norm() / ref.norm()).item()
        row.update(fp8_mm_ms=round(mm_only, 4), fp8_with_quant_ms=round(with_quant, 4),
                   fp8_tflops=round(flops / mm_only / 1e9, 1), fp8_rel_err=round(err, 5),
                   bf16_rel_err=round(err_bf16, 5))
    except (RuntimeError, TypeError) as exc:
        row["fp8_error"] = str(exc).splitlines()[0][:160]
    print(json.dumps(row), flush=True)
    return row


def fused_rows() -> list[dict]:
    """Our Triton temporal-attention kernel (``customcrafter.kernels``) against SDPA's memory-efficient kernel
    (with its transposes), as the UNet runs them, with the bandwidth floor of each shape. (A fused GEGLU kernel was
    measured here too and removed: its Triton matmul lost more to cuBLAS than the fusion saved; RESULTS.md.)"""
    return [temporal_kernel_row(name, b, h, lq, d, layers) for name, b, h, lq, _lk, d, layers in ATTENTION
            if name.startswith("temporal")]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return round(((out.float() - ref).norm() / ref.norm()).item(), 5)


def temporal_kernel_row(name: str, b: int, h: int, s: int, d: int, layers: int) -> dict:
    from customcrafter import kernels

    q, k, v = (torch.randn(b, s, h * d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = kernels.temporal_attention_reference(q.float(), k.float(), v.float(), h)
    efficient = functools.partial(_with, SDPBackend.EFFICIENT_ATTENTION, kernels.temporal_attention_reference,
                                  q, k, v, h)
    triton = functools.partial(kernels.temporal_attention, q, k, v, h)
    row = {"op": name + " (triton kernel)", "layers_per_forward": layers,
           "bandwidth_floor_ms": round(4 * q.numel() * 2 / 3.0e9, 4),
           "efficient_ms": round(cuda_time(efficient), 4), "efficient_rel_err": _rel_err(efficient(), ref),
           "triton_ms": round(cuda_time(triton), 4), "triton_rel_err": _rel_err(triton(), ref),
           "triton_config": str(kernels._temporal_attention_kernel.best_config)}
    print(json.dumps(row), flush=True)
    return row


def temporal_backward_rows() -> list[dict]:
    """Training's temporal attention, forward + backward (the q, k, v gradients), our Triton kernels against SDPA's
    memory-efficient kernel, at the UNet's levels for one instance + one class clip of 16 and of 4 frames."""
    return [temporal_backward_row(name, b, h, frames, d, layers) for name, b, h, _lq, _lk, d, layers in ATTENTION
            if name.startswith("temporal") for frames in (16, 4)]


def temporal_backward_row(name: str, b: int, h: int, s: int, d: int, layers: int) -> dict:
    from customcrafter import kernels

    q, k, v = (torch.randn(b, s, h * d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(b, s, h * d, device="cuda", dtype=torch.bfloat16)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    reference = torch.autograd.grad(kernels.temporal_attention_reference(q32, k32, v32, h), (q32, k32, v32),
                                    grad.float())

    def efficient():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return torch.autograd.grad(kernels.temporal_attention_reference(q, k, v, h), (q, k, v), grad)

    def triton():
        return torch.autograd.grad(kernels.temporal_attention(q, k, v, h), (q, k, v), grad)

    row = {"op": f"{name} {s} frames, forward + backward", "layers_per_forward": layers,
           # forward: q, k, v read, output written; backward: q, k, v, output gradient read, 3 gradients written
           "bandwidth_floor_ms": round(11 * q.numel() * 2 / 3.0e9, 4)}
    for label, fn in (("efficient", efficient), ("triton", triton)):
        row[f"{label}_ms"] = round(cuda_time(fn), 4)
        row[f"{label}_grad_rel_err"] = max(_rel_err(g, r) for g, r in zip(fn(), reference, strict=True))
    row["triton_backward_config"] = str(kernels._temporal_attention_backward_kernel.best_config)
    print(json.dumps(row), flush=True)
    return row


# (name, M tokens, channels, self-attention layers per CFG forward): spatial attn1 + temporal attn1/attn2
PROJECTIONS = [("L0", 81920, 320, 15), ("L1", 20480, 640, 15), ("L2", 5120, 1280, 15), ("L3", 1280, 1280, 3)]

# (name, images, channels, input height, input width): UNet upsamplers (CFG batch 2 x 16 frames) and VAE decoder
# upsamplers (16 frames, 320x512 output)
UPSAMPLERS = [("unet L3->L2", 32, 1280, 5, 8), ("unet L2->L1", 32, 1280, 10, 16), ("unet L1->L0", 32, 640, 20, 32),
              ("vae 40x64", 16, 512, 40, 64), ("vae 80x128", 16, 512, 80, 128), ("vae 160x256", 16, 256, 160, 256)]


def projection_rows() -> list[dict]:
    """Self-attention q/k/v as three matmuls against one matmul with the weights stacked (and split after)."""
    rows = []
    for name, m, c, layers in PROJECTIONS:
        x = torch.randn(m, c, device="cuda", dtype=torch.bfloat16)
        weights = [torch.randn(c, c, device="cuda", dtype=torch.bfloat16) / c ** 0.5 for _ in range(3)]
        stacked = torch.cat(weights)
        separate = cuda_time(lambda x=x, weights=weights: [F.linear(x, w) for w in weights])
        fused = cuda_time(lambda x=x, stacked=stacked, c=c: F.linear(x, stacked).split(c, dim=1))
        row = {"op": f"{name} q/k/v", "layers_per_forward": layers, "separate_ms": round(separate, 4),
               "stacked_ms": round(fused, 4), "saved_ms_per_forward": round((separate - fused) * layers, 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def upsample_rows() -> list[dict]:
    """Nearest 2x upsampling + 3x3 conv against its sub-pixel form (``customcrafter.fusions``: 2x2 convs on the
    input, one per output parity, run as one conv with 4x the output channels, then interleaved), channels-last bf16,
    eager and compiled."""
    from customcrafter.fusions import subpixel_upsample_conv

    rows = []
    for name, n, c, h, w in UPSAMPLERS:
        x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(c, c, 3, padding=1, device="cuda", dtype=torch.bfloat16).to(
            memory_format=torch.channels_last)

        def plain(x=x, conv=conv):
            return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

        def subpixel(x=x, conv=conv):
            return subpixel_upsample_conv(x, conv.weight, conv.bias)

        with torch.no_grad():
            ref = F.conv2d(F.interpolate(x.float(), scale_factor=2.0, mode="nearest"), conv.weight.float(),
                           conv.bias.float(), padding=1)
            row = {"op": f"upsample+conv {name}", "images": n, "channels": c, "input": [h, w],
                   "plain_tflop": round(2 * n * 4 * h * w * c * c * 9 / 1e12, 3),
                   "plain_ms": round(cuda_time(plain), 4), "subpixel_ms": round(cuda_time(subpixel), 4),
                   "plain_rel_err": _rel_err(plain(), ref), "subpixel_rel_err": _rel_err(subpixel(), ref)}
            compiled_plain, compiled_subpixel = (torch.compile(f, dynamic=False) for f in (plain, subpixel))
            row.update(plain_compiled_ms=round(cuda_time(compiled_plain), 4),
                       subpixel_compiled_ms=round(cuda_time(compiled_subpixel), 4))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# (name, input shapes concatenated on channels, groups): GroupNorm + SiLU inputs of the UNet (CFG batch 2 x 16 frames)
GROUP_NORMS = [("resnet L0", [(32, 320, 40, 64)]), ("temporal conv L0", [(2, 320, 16, 40, 64)]),
               ("up-block L0 (cat 640+320)", [(32, 640, 40, 64), (32, 320, 40, 64)]),
               ("resnet L1", [(32, 640, 20, 32)]), ("temporal conv L1", [(2, 640, 16, 20, 32)]),
               ("resnet L2", [(32, 1280, 10, 16)])]


def group_norm_rows() -> list[dict]:
    """GroupNorm + SiLU on channels-last inputs, compiled: inductor's own GroupNorm (its reduction walks each group's
    channels, a few contiguous values per row) against ``customcrafter.fusions.channel_stats_group_norm``
    (per-channel Welford statistics over positions, the channels contiguous), and each one's bandwidth."""
    from customcrafter.fusions import channel_stats_group_norm

    rows = []
    for name, shapes in GROUP_NORMS:
        fmt = torch.channels_last if len(shapes[0]) == 4 else torch.channels_last_3d
        parts = [torch.randn(s, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=fmt) * 3 + 1
                 for s in shapes]
        channels = sum(s[1] for s in shapes)
        weight = (torch.rand(channels, device="cuda") + 0.5).to(torch.bfloat16)
        bias = torch.randn(channels, device="cuda").to(torch.bfloat16)

        def native(*xs, weight=weight, bias=bias):
            return F.silu(F.group_norm(torch.cat(xs, dim=1), 32, weight, bias, 1e-6))

        def channel_stats(*xs, weight=weight, bias=bias):
            return F.silu(channel_stats_group_norm(torch.cat(xs, dim=1), 32, weight, bias, 1e-6))

        ref = F.silu(F.group_norm(torch.cat([p.double() for p in parts], dim=1), 32, weight.double(), bias.double(),
                                  1e-6))
        moved = 2 * sum(p.numel() for p in parts) * 2  # bytes: read once, write once
        row = {"op": f"group_norm+silu {name}", "floor_ms_at_3tb": round(moved / 3.0e9, 4)}
        for label, fn in (("inductor", native), ("channel_stats", channel_stats)):
            compiled = torch.compile(fn, dynamic=False)
            with torch.no_grad():
                ms = cuda_time(functools.partial(compiled, *parts))
                row[label + "_ms"] = round(ms, 4)
                row[label + "_tb_s"] = round(moved / ms / 1e9, 2)
                row[label + "_rel_err"] = _rel_err(compiled(*parts), ref.float())
        row["eager_ms"] = round(cuda_time(functools.partial(native, *parts)), 4)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def graph_ms(fn) -> float:
    """Median ms of one call of ``fn`` replayed in a CUDA graph (no launch gaps, as in the UNet's graph)."""
    import triton.testing

    fn()  # compile, autotune and warm up outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


# (name, GroupNorm input shape): resnet (frames as images, channels-last) and temporal-conv (5-D, channels-last-3d)
# GroupNorms at the UNet's levels, CFG batch 2 x 16 frames at 320x512
GN_SCALE_SHIFT = [("resnet L0", (32, 320, 40, 64)), ("temporal-conv L0", (2, 320, 16, 40, 64)),
                  ("resnet L1", (32, 640, 20, 32)), ("temporal-conv L1", (2, 640, 16, 20, 32)),
                  ("resnet L2", (32, 1280, 10, 16)), ("resnet L3", (32, 1280, 5, 8))]


def gn_scale_shift_rows() -> list[dict]:
    """A convolution's bias add + ``channel_stats_group_norm`` + SiLU, compiled and replayed in a CUDA graph, with
    GroupNorm's per-(sample, channel) scale and shift computed by PyTorch ops (which inductor inlines into the pass
    over the activation) against the small kernel ``customcrafter.kernels.group_norm_scale_shift``."""
    from customcrafter import fusions, kernels

    rows = []
    for name, shape in GN_SCALE_SHIFT:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = (torch.randn(shape, device="cuda") * 3 + 1).to(torch.bfloat16).contiguous(memory_format=fmt)
        c = shape[1]
        conv_bias, bias = (torch.randn(c, device="cuda").to(torch.bfloat16) for _ in range(2))
        weight = (torch.rand(c, device="cuda") + 0.5).to(torch.bfloat16)
        per_channel = (c,) + (1,) * (len(shape) - 2)

        def layer(x, conv_bias=conv_bias, weight=weight, bias=bias, per_channel=per_channel):
            return F.silu(fusions.channel_stats_group_norm(x + conv_bias.view(per_channel), 32, weight, bias, 1e-6))

        with torch.no_grad():
            ref = layer(x.double(), conv_bias.double(), weight.double(), bias.double()).float()
        moved = 3 * x.numel() * 2  # bytes: read for the statistics, read and write for the scale-and-shift pass
        row = {"op": f"conv bias + group_norm + silu {name}", "floor_ms_at_3tb": round(moved / 3.0e9, 4)}
        for label, scale_shift in (("inlined", kernels.group_norm_scale_shift_reference),
                                   ("kernel", kernels.group_norm_scale_shift)):
            fusions.group_norm_scale_shift = fusions.group_norm_scale_shift_reference = scale_shift
            torch._dynamo.reset()
            compiled = torch.compile(layer, dynamic=False)
            with torch.no_grad():
                ms = graph_ms(functools.partial(compiled, x))
                row[label + "_ms"] = round(ms, 4)
                row[label + "_tb_s"] = round(moved / ms / 1e9, 2)
                row[label + "_rel_err"] = _rel_err(compiled(x), ref)
        fusions.group_norm_scale_shift = kernels.group_norm_scale_shift
        fusions.group_norm_scale_shift_reference = kernels.group_norm_scale_shift_reference
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# (name, sequences, heads, head_dim) of the temporal attention calls of one CFG forward (16 frames)
TEMPORAL_CALLS = [("transformer_in (latents once)", 2560, 8, 64), ("L0", 5120, 5, 64), ("L1", 1280, 10, 64),
                  ("L2", 320, 20, 64)]


def temporal_config_rows(sets: int = 4) -> list[dict]:
    """Each of the temporal-attention kernel's autotuning configs, launched directly, replayed in a CUDA graph over
    ``sets`` input sets in turn (so that the inputs come from device memory, not the L2 cache): how much the choice
    between them matters at each shape. (Session 10 also timed the grid with row blocks as the fastest axis here,
    3-7 % slower: code in commit 61c1f32.)"""
    import math

    import triton

    from customcrafter import kernels

    rows = []
    for name, b, h, d in TEMPORAL_CALLS:
        inputs = [[torch.randn(b, 16, h * d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
                  for _ in range(sets)]
        row = {"op": f"temporal attention {name}", "floor_ms_at_3tb": round(4 * inputs[0][0].numel() * 2 / 3.0e9, 4)}
        for config in kernels._temporal_attention_kernel.configs:
            block, warps = config.kwargs["BLOCK_R"], config.num_warps

            def launch(q, k, v, block=block, warps=warps, h=h, d=d):
                out = torch.empty_like(q)
                kernels._temporal_attention_kernel.fn[(h, triton.cdiv(q.shape[0], block // q.shape[1]))](
                    q, k, v, out, q.shape[0] * q.shape[1], q.stride(1), k.stride(1), v.stride(1), out.stride(1),
                    QK_SCALE=math.log2(math.e) / math.sqrt(d), SEQ=q.shape[1], HEAD_DIM=d, BLOCK_R=block,
                    num_warps=warps, num_stages=1)
                return out

            label = f"block{block}_warps{warps}"
            row[label + "_ms"] = round(graph_ms(lambda launch=launch, inputs=inputs: [launch(*qkv) for qkv in inputs])
                                       / sets, 4)
            row[label + "_equal_to_op"] = bool(torch.equal(launch(*inputs[0]),
                                                           kernels.temporal_attention(*inputs[0], h)))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def gpu_work_per_call(fn, calls: int = 10) -> dict:
    """What one call of ``fn`` runs on the GPU, under the profiler: memsets, kernel time (memsets left out) and the
    kernels' names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    kernels = [e for e in events if "emset" not in e.name]
    return {"memsets_per_call": (len(events) - len(kernels)) / calls,
            "kernel_us": round(sum(e.time_range.elapsed_us() for e in kernels) / calls, 2),
            "kernels": sorted({e.name[:80] for e in kernels})}


def bias_rows() -> list[dict]:
    """The UNet's linear layers with their bias in cuBLAS's epilogue (``F.linear``) against the plain matmul whose
    bias add ``customcrafter.fusions.unfused_bias_linear`` leaves to the next fused kernel, and how many memsets
    each call issues (one per cuBLAS call, whatever the form)."""
    rows = []
    for name, m, k, n in LINEAR:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        row = {"op": name, "shape_mkn": [m, k, n]}
        forms = (("bias_epilogue", functools.partial(F.linear, x, weight, bias)),
                 ("plain_mm", functools.partial(torch.mm, x, weight.t())))
        for label, fn in forms:
            row[label + "_ms"] = round(cuda_time(fn), 4)
            row[label + "_memsets_per_call"] = gpu_work_per_call(fn)["memsets_per_call"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def graph_rows() -> list[dict]:
    """What a GEMM or a convolution costs inside a CUDA graph beyond its kernel: kernel time and memsets per call
    (under the profiler, for each BLAS library PyTorch can pick), and the time per call replayed back to back in a
    CUDA graph (``graph_ms``). A pointwise add (no memset) is the yardstick for the gap a graph leaves between kernels.
    ``CUBLAS_WORKSPACE_CONFIG`` in the environment changes cuBLAS's workspace (``:0:0`` = none)."""
    import os

    torch.backends.cudnn.benchmark = True
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    x1, w1 = torch.randn(20480, 640, **bf16), torch.randn(640, 640, **bf16)
    x2, w2 = torch.randn(5120, 5120, **bf16), torch.randn(1280, 5120, **bf16)
    x0, w0 = torch.randn(81920, 320, **bf16), torch.randn(960, 320, **bf16)
    c1 = torch.randn(32, 640, 40, 64, **bf16).contiguous(memory_format=torch.channels_last)
    k1 = torch.randn(640, 640, 3, 3, **bf16).contiguous(memory_format=torch.channels_last)
    c2 = torch.randn(32, 1280, 10, 16, **bf16).contiguous(memory_format=torch.channels_last)
    k2 = torch.randn(1280, 1280, 3, 3, **bf16).contiguous(memory_format=torch.channels_last)
    a, b = torch.randn(20480, 640, **bf16), torch.randn(20480, 640, **bf16)
    bias1 = torch.randn(640, **bf16)
    cases = [("add 20480x640", lambda: a + b), ("mm 20480x640x640", lambda: x1 @ w1.t()),
             ("linear+bias 20480x640x640 (cuBLASLt epilogue)", lambda: F.linear(x1, w1, bias1)),
             ("mm 81920x320x960 (stacked L0 q/k/v)", lambda: x0 @ w0.t()),
             ("mm 5120x5120x1280 (L2 ff-out)", lambda: x2 @ w2.t()),
             ("conv3x3 32x640x40x64", lambda: F.conv2d(c1, k1, padding=1)),
             ("conv3x3 32x1280x10x16", lambda: F.conv2d(c2, k2, padding=1))]
    rows = []
    library_before = torch.backends.cuda.preferred_blas_library()
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        for name, fn in cases:
            row = {"op": name, "blas": library, "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                   "cublaslt_workspace_size": os.environ.get("CUBLASLT_WORKSPACE_SIZE")}
            try:
                row["eager_us"] = round(1000 * cuda_time(fn), 2)
            except RuntimeError as exc:  # e.g. cuBLASLt refusing to run without a workspace
                row["error"] = str(exc)[:200]
            else:
                row |= gpu_work_per_call(fn)
                row["graph_us_per_op"] = round(1000 * graph_ms(fn), 2)
                row["graph_gap_us"] = round(row["graph_us_per_op"] - row["kernel_us"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    torch.backends.cuda.preferred_blas_library(library_before)
    return rows


# (name, channels, height, width, layers per forward): the resnets' temporal (3, 1, 1) convolutions, CFG batch 2 x 16
# frames at 320x512, channels-last-3d as the compiled UNet holds them (4 per resnet: 5, 5, 5 and 7 resnets a level)
TEMPORAL_CONVS = [("L0", 320, 40, 64, 20), ("L1", 640, 20, 32, 20), ("L2", 1280, 10, 16, 20), ("L3", 1280, 5, 8, 28)]


def temporal_conv_forms(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict:
    """The same (3, 1, 1) convolution with padding (1, 0, 0) written four ways (all exact in real arithmetic):
    cuDNN's 3-D convolution; a 2-D (3, 1) convolution over the (frames, positions) view of the same memory (the
    product's ``SpeedConfig.temporal_conv2d`` until session 24 found no gain in the whole UNet); one GEMM against the
    three taps' weights side by side, then the frame-shifted sum of its three column blocks; and one GEMM over the
    frames' shifted copies concatenated on channels (im2col along frames)."""
    n, c, t, h, w = x.shape
    taps = weight[:, :, :, 0, 0]  # (out, in, 3)

    def conv3d():
        return F.conv3d(x, weight, bias, padding=(1, 0, 0))

    def conv2d():  # x is channels-last-3d: (n, c, t, h * w) as a channels-last 4-D view, and back
        flat = x.permute(0, 2, 3, 4, 1).flatten(2, 3).permute(0, 3, 1, 2)
        out = F.conv2d(flat, weight.flatten(3), bias, padding=(1, 0))
        return out.permute(0, 2, 3, 1).unflatten(2, (h, w)).permute(0, 4, 1, 2, 3)

    def gemm_shift():
        rows = x.permute(0, 2, 3, 4, 1).reshape(n, t, h * w, c)  # a view: channels-last-3d memory
        y = (rows @ taps.permute(1, 2, 0).reshape(c, -1)).view(n, t, h * w, 3, -1)
        out = y[:, :, :, 1] + bias
        out = torch.cat([out[:, :1], out[:, 1:] + y[:, :-1, :, 0]], dim=1)  # tap 0 sees the previous frame
        out = torch.cat([out[:, :-1] + y[:, 1:, :, 2], out[:, -1:]], dim=1)  # tap 2 the next one
        return out.view(n, t, h, w, -1).permute(0, 4, 1, 2, 3)

    def im2col():
        rows = x.permute(0, 2, 3, 4, 1).reshape(n, t, h * w, c)
        zero = rows.new_zeros(n, 1, h * w, c)
        cols = torch.cat([torch.cat([zero, rows[:, :-1]], 1), rows, torch.cat([rows[:, 1:], zero], 1)], dim=-1)
        out = cols @ taps.permute(2, 1, 0).reshape(3 * c, -1) + bias
        return out.view(n, t, h, w, -1).permute(0, 4, 1, 2, 3)

    return {"conv3d": conv3d, "conv2d": conv2d, "gemm_shift": gemm_shift, "im2col": im2col}


def temporal_conv_rows() -> list[dict]:
    """The resnets' temporal convolutions (~14 % of a step's FLOPs) in each form of ``temporal_conv_forms``,
    compiled and replayed in a CUDA graph, with their TFLOP/s and error against float64."""
    rows = []
    for name, c, h, w, layers in TEMPORAL_CONVS:
        x = torch.randn(2, c, 16, h, w, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last_3d)
        weight = (torch.randn(c, c, 3, 1, 1, device="cuda") / (3 * c) ** 0.5).to(torch.bfloat16)
        bias = torch.randn(c, device="cuda", dtype=torch.bfloat16)
        ref = F.conv3d(x.double(), weight.double(), bias.double(), padding=(1, 0, 0))
        tflop = 2 * x.numel() * 3 * c / 1e12
        row = {"op": f"temporal conv {name}", "channels": c, "positions": h * w, "layers": layers,
               "tflop": round(tflop, 4)}
        with torch.no_grad():
            for form, fn in temporal_conv_forms(x, weight, bias).items():
                compiled = torch.compile(fn, dynamic=False)
                ms = graph_ms(compiled)
                row[form + "_ms"] = round(ms, 4)
                row[form + "_tflop_s"] = round(tflop / ms * 1e3, 1)
                row[form + "_rel_err"] = _rel_err(compiled(), ref.float())
                row[form + "_ms_per_forward"] = round(ms * layers, 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


SECTIONS = {"attention": attention_rows, "temporal": temporal_rows, "linear": linear_rows, "fused": fused_rows,
            "projections": projection_rows, "upsample": upsample_rows, "groupnorm": group_norm_rows,
            "bias": bias_rows, "graph": graph_rows, "gn_scale_shift": gn_scale_shift_rows,
            "temporal_configs": temporal_config_rows, "temporal_backward": temporal_backward_rows,
            "temporal_conv": temporal_conv_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="micro_ops.json")
    parser.add_argument("--only", choices=list(SECTIONS), nargs="+", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/micro_ops.py needs a CUDA GPU")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    for section, rows in SECTIONS.items():
        if args.only is None or section in args.only:
            report[section] = rows()
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
