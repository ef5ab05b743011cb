"""Triton kernels for memory-bound spots of the UNet (CUDA; a plain PyTorch path elsewhere): at inference, and for
the temporal attention in training too.

``temporal_attention(q, k, v, heads)``: attention over short sequences (the temporal transformers' 16 frames),
read straight from and written straight to the projections' ``(batch, frames, channels)`` layout. One program
takes several whole sequences of one head as a ``(rows, head_dim)`` tile, does the ``QK^T`` and ``PV`` products as
one block-diagonal tile product each (the off-diagonal blocks are masked out: a few wasted multiply-adds, which
the tensor cores have to spare) and keeps the scores on chip. SDPA's kernels are built for long sequences: at 16
frames they run at a fraction of the memory bandwidth (``benchmarks/micro_ops.py``).

``group_norm_scale_shift(mean_c, var_c, weight, bias, groups, eps)``: GroupNorm's per-(sample, channel) scale and
shift (``y = x * scale + shift``) from per-channel statistics, in one small kernel. Computed by PyTorch ops under
``torch.compile``, they are pointwise functions of tiny tensors, and inductor inlines them into the pass over the
activation: every element then recomputed its group's statistics, ``rsqrt`` and all. Those GroupNorm + SiLU passes
ran at 1.4-1.8 TB/s on the H100 instead of ~2.9 (``benchmarks/RESULTS.md``, session 10). A kernel's outputs are
always materialized, so the pass over the activation is left with one multiply-add per element.

``geglu(x, weight, bias)``: the feed-forward's GEGLU (diffusers' ``GEGLU``: ``value, gate = F.linear(x, weight,
bias).chunk(2, -1)``, ``value * gelu(gate)``) as one GEMM whose epilogue adds the bias and does the gating, so the
2N-wide projection never reaches memory: two float32 accumulators per output tile (the value half and the gate half
of the weight share each loaded tile of ``x``), device-side TMA loads, a persistent loop over output tiles. Its GELU
is a polynomial that rounds to bf16 as the exact (erf) GELU does (``GELU_POLYNOMIAL``), ten multiply-adds instead of
libdevice's ``erf``. At the UNet's level-0 shape (81920 x 320 -> 2 x 1280) it takes 0.34 ms against 0.26 ms for
cuBLAS's 2N-wide GEMM + 0.21 ms for inductor's gating pass (H100, ``benchmarks/probe_geglu.py``); where K is 1280
cuBLAS + the pass is as fast.
It needs a Hopper-class card (device-side TMA, ~176 KiB of shared memory per block); the other kernels need Ampere
or newer. Other cards (an A100, a consumer 24 GB card) take the PyTorch paths for what they cannot launch.

``temporal_attention`` has a backward (training): a second kernel of the same tiling that recomputes each tile's
softmax from q and k and writes the three input gradients, so nothing is saved for it but its inputs.

They are registered with ``torch.library.triton_op``, so ``torch.compile`` sees through them (and AOTAutograd
through the temporal kernel's backward). The other two are inference-only: callers fall back to PyTorch whenever a
gradient is needed, as every caller does on the CPU.
``temporal_attention_reference`` and ``group_norm_scale_shift_reference`` are the PyTorch formulations they replace.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F

__all__ = ["HAS_TRITON", "GELU_POLYNOMIAL", "GELU_POLYNOMIAL_LIMIT", "geglu", "geglu_reference", "geglu_supported",
           "gelu_polynomial", "group_norm_scale_shift",
           "group_norm_scale_shift_reference", "temporal_attention", "temporal_attention_reference",
           "temporal_attention_supported"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.bfloat16, torch.float16)
_MAX_GRID_Y = 65535
_GEGLU_BLOCK_N = 128  # output columns per tile: the gate half starts N rows into the weight, so N % 128 == 0
#: Triton's bf16 tensor-core products need Ampere (sm_80) or newer: older cards take the PyTorch paths.
_MIN_CAPABILITY = (8, 0)
#: Shared memory per block that the GEGLU kernel's smallest tile configuration needs: 3 pipeline stages of a 128 x 64
#: tile of x and two of the weight, and the 128 x 128 output tile of the TMA store, bf16. Hopper and datacenter
#: Blackwell have 227 KiB; the A100 has 163 KiB, consumer cards (sm_86/89/120, e.g. 24 GB RTX cards) 99 KiB.
_GEGLU_SHARED_MEMORY = 3 * (128 * 64 + 2 * 128 * 64) * 2 + 128 * 128 * 2

#: The GEGLU kernel's GELU: ``Φ(x) - 1/2 ≈ x · Σ_i c_i x^(2i)`` for ``|x| <= GELU_POLYNOMIAL_LIMIT`` (the normal CDF
#: ``Φ``, GELU = ``x · Φ(x)``), a weighted minimax fit (``benchmarks/fit_gelu_polynomial.py``). Evaluated in float32 it
#: is within 0.33 of a bf16 ulp of the exact (erf) GELU wherever ``|GELU(x)| >= 1e-3``, and within 1.3e-4 absolute
#: below (the tail past -4, where GELU is at most 1.3e-4 away from 0): the kernel's bf16 output rounds as the exact
#: function's would. Ten multiply-adds instead of libdevice's ``erf`` (~25 instructions and a special-function unit
#: operation), whose cost showed in the kernel's non-overlapped epilogue. H100, ms per call
#: (``benchmarks/probe_geglu.py``, RESULTS.md session 26): level 0 0.391 with ``erf``, 0.344 with this, 0.286 with no
#: GELU at all; level 1 0.316, 0.296, 0.270.
GELU_POLYNOMIAL_LIMIT = 4.0
GELU_POLYNOMIAL = (0.3989351987838745, -0.06646029651165009, 0.009935075417160988, -0.001163922599516809,
                   0.0001073008679668419, -7.66577613831032e-06, 4.063206233695382e-07, -1.484330525158839e-08,
                   3.2949840078622117e-10, -3.31923182515792e-12)


def gelu_polynomial(x: torch.Tensor) -> torch.Tensor:
    """The GEGLU kernel's GELU in PyTorch, float32, in the kernel's order of operations (tests check the fit on the
    CPU with it): ``x · Φ(x)`` with ``Φ`` from ``GELU_POLYNOMIAL`` on ``[-limit, limit]``; past the limit the
    clamped polynomial's end value plus ``max(x - limit, 0)``, i.e. ~0 below and ``x`` above."""
    x = x.float()
    clamped = x.clamp(-GELU_POLYNOMIAL_LIMIT, GELU_POLYNOMIAL_LIMIT)
    square = clamped * clamped
    poly = torch.full_like(x, GELU_POLYNOMIAL[-1])
    for coefficient in GELU_POLYNOMIAL[-2::-1]:
        poly = poly * square + coefficient
    return clamped * (0.5 + clamped * poly) + (x - GELU_POLYNOMIAL_LIMIT).clamp_min(0.0)


@functools.cache
def _device_runs(device_index: int) -> tuple[bool, bool]:
    """(the temporal attention and GroupNorm kernels, the GEGLU kernel) on CUDA device ``device_index``: asked once
    per device, not on every call of the support checks."""
    capability = torch.cuda.get_device_capability(device_index)
    geglu = capability >= (9, 0) and _max_shared_memory(device_index) >= _GEGLU_SHARED_MEMORY
    return capability >= _MIN_CAPABILITY, geglu


@torch.compiler.assume_constant_result
def _runs_triton_kernels(device_index: int) -> bool:
    """Whether CUDA device ``device_index`` runs the temporal attention and GroupNorm kernels (compute capability 8.0
    or newer). A constant to ``torch.compile``: read at trace time, no graph break."""
    return _device_runs(device_index)[0]


@torch.compiler.assume_constant_result
def _runs_geglu_kernel(device_index: int) -> bool:
    """Whether CUDA device ``device_index`` runs the GEGLU kernel: device-side TMA (Hopper, sm_90, or newer) and the
    shared memory of its tile configurations (``_GEGLU_SHARED_MEMORY``, as Triton counts it). Elsewhere the kernel
    could not launch (Triton's out-of-resources error), so those cards keep cuBLAS + the gating pass."""
    return _device_runs(device_index)[1]


def _max_shared_memory(device_index: int) -> int:
    """Shared memory per block that Triton may use on CUDA device ``device_index`` (its own launch check's figure)."""
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def temporal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention over dim 1 of ``(batch, seq, channels)`` tensors, as diffusers' SDPA processor."""
    b, s, c = q.shape
    q, k, v = (t.reshape(b, s, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, c)


def _no_grad(*tensors: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _sequence_rows(t: torch.Tensor) -> bool:
    """Whether a ``(batch, seq, channels)`` tensor is laid out as the temporal kernels read it: contiguous channels,
    rows evenly strided (batch stride = seq x row stride), e.g. a column slice of a fused projection."""
    return t.stride(2) == 1 and t.stride(0) == t.shape[1] * t.stride(1)


def temporal_attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """Whether the Triton kernel takes these inputs: CUDA, bf16/fp16, sequences of at most 64, a head dim that is a
    power of two from 16 to 128, and rows of each tensor evenly strided with contiguous channels. Gradients are fine:
    the op's backward is a second kernel of the same form (training)."""
    if not (HAS_TRITON and q.is_cuda and q.dim() == 3 and q.dtype in _DTYPES and _runs_triton_kernels(q.device.index)):
        return False
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
        return False
    b, s, c = q.shape
    d = c // heads
    if c % heads or d & (d - 1) or not 16 <= d <= 128 or not 1 <= s <= 64:
        return False
    if -(-b // (64 // s)) > _MAX_GRID_Y:  # row blocks (64 rows at the least) are the grid's second axis
        return False
    return all(_sequence_rows(t) for t in (q, k, v))


def group_norm_scale_shift_reference(mean_c: torch.Tensor, var_c: torch.Tensor, weight: torch.Tensor | None,
                                     bias: torch.Tensor | None, groups: int,
                                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm's ``(scale, shift)``, each ``(samples, channels)``, from each channel's mean and biased variance
    ``(samples, channels)``: a group's mean is the mean of its channels' means and its variance the mean of their
    variances plus the variance of their means (exact for equal counts)."""
    n, c = mean_c.shape
    mean_c, var_c = mean_c.view(n, groups, -1), var_c.view(n, groups, -1)
    mean_g = mean_c.mean(-1, keepdim=True)
    var_g = var_c.mean(-1, keepdim=True) + (mean_c - mean_g).square().mean(-1, keepdim=True)
    scale = torch.rsqrt(var_g + eps).expand(n, groups, c // groups)
    if weight is not None:
        scale = scale * weight.to(scale.dtype).view(groups, -1)
    shift = -mean_g * scale
    if bias is not None:
        shift = shift + bias.to(scale.dtype).view(groups, -1)
    return scale.reshape(n, c), shift.reshape(n, c)


def group_norm_scale_shift(mean_c: torch.Tensor, var_c: torch.Tensor, weight: torch.Tensor | None,
                           bias: torch.Tensor | None, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``group_norm_scale_shift_reference`` through the Triton kernel for float32 statistics on CUDA with no
    gradient (what the UNet and the VAE decoder compute at inference), else through PyTorch."""
    n, c = mean_c.shape
    params = [t for t in (weight, bias) if t is not None]
    if (HAS_TRITON and mean_c.is_cuda and mean_c.dtype == var_c.dtype == torch.float32 and c % groups == 0
            and _no_grad(mean_c, var_c, *params) and all(t.shape == (c,) for t in params)
            and _runs_triton_kernels(mean_c.device.index)):
        ones = weight if weight is not None else mean_c.new_ones(c)
        zeros = bias if bias is not None else mean_c.new_zeros(c)
        return torch.ops.customcrafter.group_norm_scale_shift(mean_c.contiguous(), var_c.contiguous(), ones, zeros,
                                                              groups, eps)
    return group_norm_scale_shift_reference(mean_c, var_c, weight, bias, groups, eps)


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """diffusers' ``GEGLU.forward`` given its projection's ``weight`` ``(2N, K)`` and ``bias``: exact (erf) GELU."""
    value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return value * F.gelu(gate)


def geglu_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the Triton kernel takes these inputs: a CUDA device that runs it (``_runs_geglu_kernel``), bf16/fp16
    throughout, a bias, no gradient, N a multiple of 128, and what TMA needs: contiguous channels, 16-byte aligned
    rows (K a multiple of 8, a row-major weight)."""
    if not (HAS_TRITON and x.is_cuda and x.dtype in _DTYPES and bias is not None and _no_grad(x, weight, bias)):
        return False
    if not _runs_geglu_kernel(x.device.index):
        return False
    if not (weight.dim() == 2 and weight.dtype == bias.dtype == x.dtype and bias.shape == (weight.shape[0],)):
        return False
    two_n, k = weight.shape
    if x.dim() < 2 or x.shape[-1] != k or two_n % (2 * _GEGLU_BLOCK_N) or k % 8:
        return False
    return weight.is_contiguous() and bias.is_contiguous()


def _torch_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator() -> None:
    """Device-side TMA descriptors are built in scratch memory that Triton asks its allocator for at launch. Inside
    ``torch.compile`` inductor provides it; for eager launches Triton's default allocator raises, so PyTorch's
    caching allocator is installed unless the caller set one."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``geglu_reference`` through the Triton kernel where it applies, else through PyTorch."""
    if not geglu_supported(x, weight, bias):
        return geglu_reference(x, weight, bias)
    if not torch.compiler.is_compiling():
        _ensure_scratch_allocator()
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1 or rows.stride(0) % 8:
        rows = rows.contiguous()
    return torch.ops.customcrafter.geglu(rows, weight, bias).view(*x.shape[:-1], weight.shape[0] // 2)


def temporal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``temporal_attention_reference`` through the Triton kernel where it applies, else through PyTorch."""
    if temporal_attention_supported(q, k, v, heads):
        return torch.ops.customcrafter.temporal_attention(q, k, v, heads)
    return temporal_attention_reference(q, k, v, heads)


if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
    from torch.utils.flop_counter import register_flop_formula

    @triton.autotune(configs=[triton.Config({"BLOCK_R": r}, num_warps=w, num_stages=1)
                              for r in (64, 128) for w in (4, 8)],
                     key=["n_rows", "SEQ", "HEAD_DIM"])
    @triton.jit
    def _temporal_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, n_rows, stride_q, stride_k, stride_v, stride_o,
                                   QK_SCALE: tl.constexpr, SEQ: tl.constexpr, HEAD_DIM: tl.constexpr,
                                   BLOCK_R: tl.constexpr):
        seqs = BLOCK_R // SEQ  # whole sequences per program (rows past seqs * SEQ are padding)
        local = tl.arange(0, BLOCK_R)
        # the head is the grid's fastest axis: the programs of all heads of one row block run side by side and together
        # read whole rows (at level 0 a head's slice of a row is 128 of its 640 bytes; 3-7 % faster than row blocks
        # fastest, RESULTS.md session 10)
        rows = tl.program_id(1) * seqs * SEQ + local
        valid = (local < seqs * SEQ) & (rows < n_rows)
        cols = tl.program_id(0) * HEAD_DIM + tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=valid[:, None], other=0.0)
        k = tl.load(k_ptr + rows[:, None] * stride_k + cols[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + rows[:, None] * stride_v + cols[None, :], mask=valid[:, None], other=0.0)
        # log2 domain: QK_SCALE includes log2(e). A compile-time constant, so the scores stay float32: as a run-time
        # argument inside torch.compile it arrived as a float64, which made the scores, their softmax and exp2
        # float64 (1.8x the kernel's time inside the compiled UNet, session 10)
        scores = tl.dot(q, tl.trans(k)) * QK_SCALE
        same_sequence = (local[:, None] // SEQ) == (local[None, :] // SEQ)
        scores = tl.where(same_sequence, scores, float("-inf"))
        p = tl.exp2(scores - tl.max(scores, axis=1)[:, None])
        out = tl.dot(p.to(v.dtype), v) / tl.sum(p, axis=1)[:, None]
        tl.store(o_ptr + rows[:, None] * stride_o + cols[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=valid[:, None])

    def _temporal_grid(b: int, s: int, heads: int):
        """Both temporal kernels' grid: one head per program on the first axis, row blocks of whole sequences on the
        second (what ``temporal_attention_supported`` bounds by ``_MAX_GRID_Y``)."""
        return lambda meta: (heads, triton.cdiv(b, meta["BLOCK_R"] // s))

    def _temporal_qk_scale(head_dim: int) -> float:
        """The scores' scale in the log2 domain (the kernels' softmax uses exp2)."""
        return math.log2(math.e) / math.sqrt(head_dim)

    @triton_op("customcrafter::temporal_attention", mutates_args=())
    def _temporal_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        b, s, c = q.shape
        head_dim = c // heads
        out = torch.empty((b, s, c), device=q.device, dtype=q.dtype)
        wrap_triton(_temporal_attention_kernel)[_temporal_grid(b, s, heads)](
            q, k, v, out, b * s, q.stride(1), k.stride(1), v.stride(1), out.stride(1),
            QK_SCALE=_temporal_qk_scale(head_dim), SEQ=s, HEAD_DIM=head_dim)
        return out

    @triton.autotune(configs=[triton.Config({"BLOCK_R": r}, num_warps=w, num_stages=1)
                              for r in (64, 128) for w in (4, 8)],
                     key=["n_rows", "SEQ", "HEAD_DIM"])
    @triton.jit
    def _temporal_attention_backward_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, n_rows, stride_q,
                                            stride_k, stride_v, stride_do, stride_grad, QK_SCALE: tl.constexpr,
                                            SM_SCALE: tl.constexpr, SEQ: tl.constexpr, HEAD_DIM: tl.constexpr,
                                            BLOCK_R: tl.constexpr):
        # the forward's tiling: whole sequences of one head per program, so every gradient row is complete in the
        # program that computes it (no atomics, no second pass). The softmax is recomputed from q and k (nothing
        # saved but the inputs) and delta_i = sum_j P_ij dP_ij = dO_i . O_i needs no output either. The tile's loads
        # and softmax repeat the forward's on purpose: moved into a shared @triton.jit function, torch's mutation
        # analysis of the kernels (what lets compiled code skip defensive copies) marks q, k and v as written
        # (torch 2.13, checked on the CPU), and compiled callers would copy them before every call
        # (tests/test_gpu_kernels.py checks what each kernel is taken to write)
        seqs = BLOCK_R // SEQ
        local = tl.arange(0, BLOCK_R)
        rows = tl.program_id(1) * seqs * SEQ + local
        valid = (local < seqs * SEQ) & (rows < n_rows)
        cols = tl.program_id(0) * HEAD_DIM + tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=valid[:, None], other=0.0)
        k = tl.load(k_ptr + rows[:, None] * stride_k + cols[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + rows[:, None] * stride_v + cols[None, :], mask=valid[:, None], other=0.0)
        do = tl.load(do_ptr + rows[:, None] * stride_do + cols[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * QK_SCALE
        same_sequence = (local[:, None] // SEQ) == (local[None, :] // SEQ)
        scores = tl.where(same_sequence, scores, float("-inf"))
        p = tl.exp2(scores - tl.max(scores, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]  # zero off the diagonal blocks, so the products below stay per sequence
        dv = tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        dq = tl.dot(ds.to(k.dtype), k) * SM_SCALE
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q) * SM_SCALE
        grad = rows[:, None] * stride_grad + cols[None, :]
        tl.store(dq_ptr + grad, dq.to(dq_ptr.dtype.element_ty), mask=valid[:, None])
        tl.store(dk_ptr + grad, dk.to(dk_ptr.dtype.element_ty), mask=valid[:, None])
        tl.store(dv_ptr + grad, dv.to(dv_ptr.dtype.element_ty), mask=valid[:, None])

    @triton_op("customcrafter::temporal_attention_backward", mutates_args=())
    def _temporal_attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                                        heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, c = q.shape
        head_dim = c // heads
        if not _sequence_rows(grad_out):
            grad_out = grad_out.contiguous()
        dq, dk, dv = (torch.empty((b, s, c), device=q.device, dtype=q.dtype) for _ in range(3))
        wrap_triton(_temporal_attention_backward_kernel)[_temporal_grid(b, s, heads)](
            q, k, v, grad_out, dq, dk, dv, b * s, q.stride(1), k.stride(1), v.stride(1), grad_out.stride(1), c,
            QK_SCALE=_temporal_qk_scale(head_dim), SM_SCALE=1 / math.sqrt(head_dim), SEQ=s, HEAD_DIM=head_dim)
        return dq, dk, dv

    def _temporal_attention_setup_context(ctx, inputs, output) -> None:
        q, k, v, heads = inputs
        ctx.save_for_backward(q, k, v)
        ctx.heads = heads

    def _temporal_attention_backward(ctx, grad_out: torch.Tensor):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = torch.ops.customcrafter.temporal_attention_backward(q, k, v, grad_out, ctx.heads)
        return dq, dk, dv, None

    _temporal_attention_op.register_autograd(_temporal_attention_backward,
                                             setup_context=_temporal_attention_setup_context)

    @triton.jit
    def _group_norm_scale_shift_kernel(mean_ptr, var_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, channels, eps,
                                       PER_GROUP: tl.constexpr, BLOCK: tl.constexpr):
        # one program per (sample, group); statistics (samples, channels) float32 contiguous
        group_start = tl.program_id(0) * PER_GROUP  # = sample * channels + group * PER_GROUP
        lane = tl.arange(0, BLOCK)
        inside = lane < PER_GROUP
        mean = tl.load(mean_ptr + group_start + lane, mask=inside, other=0.0)
        var = tl.load(var_ptr + group_start + lane, mask=inside, other=0.0)
        mean_g = tl.sum(mean, axis=0) / PER_GROUP
        spread = tl.where(inside, mean - mean_g, 0.0)
        var_g = tl.sum(var, axis=0) / PER_GROUP + tl.sum(spread * spread, axis=0) / PER_GROUP
        channel = group_start % channels + lane
        weight = tl.load(weight_ptr + channel, mask=inside, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + channel, mask=inside, other=0.0).to(tl.float32)
        scale = weight / tl.sqrt_rn((var_g + eps).to(tl.float32))  # inductor passes eps as a float64
        tl.store(scale_ptr + group_start + lane, scale, mask=inside)
        tl.store(shift_ptr + group_start + lane, bias - mean_g * scale, mask=inside)

    @triton_op("customcrafter::group_norm_scale_shift", mutates_args=())
    def _group_norm_scale_shift_op(mean_c: torch.Tensor, var_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                   groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        n, c = mean_c.shape
        scale = torch.empty((n, c), device=mean_c.device, dtype=torch.float32)
        shift = torch.empty((n, c), device=mean_c.device, dtype=torch.float32)
        per_group = c // groups
        wrap_triton(_group_norm_scale_shift_kernel)[(n * groups,)](
            mean_c, var_c, weight, bias, scale, shift, c, eps, PER_GROUP=per_group,
            BLOCK=triton.next_power_of_2(per_group))
        return scale, shift

    _GELU_LIMIT = tl.constexpr(GELU_POLYNOMIAL_LIMIT)
    _GELU_C0, _GELU_C1, _GELU_C2, _GELU_C3, _GELU_C4, _GELU_C5, _GELU_C6, _GELU_C7, _GELU_C8, _GELU_C9 = (
        tl.constexpr(c) for c in GELU_POLYNOMIAL)

    @triton.jit
    def gelu_polynomial_triton(x):
        """``gelu_polynomial`` for a float32 tile (also used by ``benchmarks/probe_geglu.py``)."""
        clamped = tl.minimum(tl.maximum(x, -_GELU_LIMIT), _GELU_LIMIT)
        square = clamped * clamped
        poly = _GELU_C9 * square + _GELU_C8
        poly = poly * square + _GELU_C7
        poly = poly * square + _GELU_C6
        poly = poly * square + _GELU_C5
        poly = poly * square + _GELU_C4
        poly = poly * square + _GELU_C3
        poly = poly * square + _GELU_C2
        poly = poly * square + _GELU_C1
        poly = poly * square + _GELU_C0
        return clamped * (0.5 + clamped * poly) + tl.maximum(x - _GELU_LIMIT, 0.0)

    @triton.jit
    def _geglu_tile(tile, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        # grouped order: GROUP_M row blocks sweep all column blocks together, so their x tiles stay in L2
        width = GROUP_M * (N // BN)
        first = (tile // width) * GROUP_M
        size = tl.minimum(tl.cdiv(M, BM) - first, GROUP_M)
        return first + (tile % width) % size, (tile % width) // size

    @triton.autotune(configs=[triton.Config({"BM": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=s)
                              for s in (3, 4)],
                     key=["M", "N", "K"])
    @triton.jit
    def _geglu_kernel(x_ptr, w_ptr, b_ptr, o_ptr, M, N, K: tl.constexpr, stride_xm, PROGRAMS: tl.constexpr,
                      BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        # out[m, n] = (x @ W[n] + b[n]) * gelu(x @ W[N + n] + b[N + n]); rows past M and columns past K are zero-filled
        # by the TMA loads and clipped by the TMA store
        x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BM, BK])
        w_desc = tl.make_tensor_descriptor(w_ptr, [2 * N, K], [K, 1], [BN, BK])
        o_desc = tl.make_tensor_descriptor(o_ptr, [M, N], [N, 1], [BM, BN])
        tiles = tl.cdiv(M, BM) * (N // BN)
        # persistent: one program per SM walks the output tiles; flattening the two loops lets the pipeliner issue the
        # next tile's loads during this tile's epilogue
        for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
            pid_m, pid_n = _geglu_tile(tile, M, N, BM, BN, GROUP_M)
            acc_value = tl.zeros((BM, BN), tl.float32)
            acc_gate = tl.zeros((BM, BN), tl.float32)
            for ki in range(tl.cdiv(K, BK)):
                a = x_desc.load([pid_m * BM, ki * BK])
                acc_value = tl.dot(a, w_desc.load([pid_n * BN, ki * BK]).T, acc_value)
                acc_gate = tl.dot(a, w_desc.load([N + pid_n * BN, ki * BK]).T, acc_gate)
            cols = pid_n * BN + tl.arange(0, BN)
            value = acc_value + tl.load(b_ptr + cols).to(tl.float32)[None, :]
            gate = acc_gate + tl.load(b_ptr + N + cols).to(tl.float32)[None, :]
            out = value * gelu_polynomial_triton(gate)
            o_desc.store([pid_m * BM, pid_n * BN], out.to(o_desc.dtype))

    @triton_op("customcrafter::geglu", mutates_args=())
    def _geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # TMA reads from 16-byte aligned addresses: a view that starts mid-way is copied (in the op, not in the caller:
        # dynamo does not trace storage_offset)
        if x.storage_offset() % 8:
            x = x.clone()
        if weight.storage_offset() % 8:
            weight = weight.clone()
        m, k = x.shape
        n = weight.shape[0] // 2
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count

        def grid(meta):
            return (min(sms, triton.cdiv(m, meta["BM"]) * (n // _GEGLU_BLOCK_N)),)

        wrap_triton(_geglu_kernel)[grid](x, weight, bias, out, m, n, k, x.stride(0), PROGRAMS=sms,
                                         BN=_GEGLU_BLOCK_N)
        return out

    # torch.utils.flop_counter counts what the ops replace (the benchmarks' TFLOP/s and MFU rest on it)
    @register_flop_formula(torch.ops.customcrafter.geglu)
    def _geglu_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * x_shape[0] * x_shape[1] * weight_shape[0]  # the 2N-wide projection, as for F.linear

    @register_flop_formula(torch.ops.customcrafter.temporal_attention)
    def _temporal_attention_flops(q_shape, *args, out_shape=None, **kwargs) -> int:
        b, s, c = q_shape
        return 4 * b * s * s * c  # QK^T and PV over every head, as for SDPA

    @register_flop_formula(torch.ops.customcrafter.temporal_attention_backward)
    def _temporal_attention_backward_flops(q_shape, *args, out_shape=None, **kwargs) -> int:
        b, s, c = q_shape
        return 10 * b * s * s * c  # the scores again, then dV, dP, dQ, dK: as torch counts SDPA's backward
