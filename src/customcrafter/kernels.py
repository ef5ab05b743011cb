"""Triton kernels for memory-bound spots of the UNet at inference (CUDA; a plain PyTorch path elsewhere).

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

They are registered with ``torch.library.triton_op``, so ``torch.compile`` sees through them. They are inference-only
(no backward): callers fall back to PyTorch whenever a gradient is needed, as they do on the CPU.
``temporal_attention_reference`` and ``group_norm_scale_shift_reference`` are the PyTorch formulations they replace.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

__all__ = ["HAS_TRITON", "group_norm_scale_shift", "group_norm_scale_shift_reference", "temporal_attention",
           "temporal_attention_reference", "temporal_attention_supported"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.bfloat16, torch.float16)
_MAX_GRID_Y = 65535


def temporal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention over dim 1 of ``(batch, seq, channels)`` tensors, as diffusers' SDPA processor."""
    b, s, c = q.shape
    q, k, v = (t.reshape(b, s, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, c)


def _no_grad(*tensors: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def temporal_attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """Whether the Triton kernel takes these inputs: CUDA, bf16/fp16, no gradient, sequences of at most 64, a head
    dim that is a power of two from 16 to 128, and rows of each tensor evenly strided with contiguous channels."""
    if not (HAS_TRITON and q.is_cuda and q.dim() == 3 and q.dtype in _DTYPES and _no_grad(q, k, v)):
        return False
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
        return False
    b, s, c = q.shape
    d = c // heads
    if c % heads or d & (d - 1) or not 16 <= d <= 128 or not 1 <= s <= 64:
        return False
    if -(-b // (64 // s)) > _MAX_GRID_Y:  # row blocks (64 rows at the least) are the grid's second axis
        return False
    return all(t.stride(2) == 1 and t.stride(0) == s * t.stride(1) for t in (q, k, v))


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
            and _no_grad(mean_c, var_c, *params) and all(t.shape == (c,) for t in params)):
        ones = weight if weight is not None else mean_c.new_ones(c)
        zeros = bias if bias is not None else mean_c.new_zeros(c)
        return torch.ops.customcrafter.group_norm_scale_shift(mean_c.contiguous(), var_c.contiguous(), ones, zeros,
                                                              groups, eps)
    return group_norm_scale_shift_reference(mean_c, var_c, weight, bias, groups, eps)


def temporal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``temporal_attention_reference`` through the Triton kernel where it applies, else through PyTorch."""
    if temporal_attention_supported(q, k, v, heads):
        return torch.ops.customcrafter.temporal_attention(q, k, v, heads)
    return temporal_attention_reference(q, k, v, heads)


if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

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

    @triton_op("customcrafter::temporal_attention", mutates_args=())
    def _temporal_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        b, s, c = q.shape
        head_dim = c // heads
        out = torch.empty((b, s, c), device=q.device, dtype=q.dtype)

        def grid(meta):
            return (heads, triton.cdiv(b, meta["BLOCK_R"] // s))  # one head, whole sequences per program

        wrap_triton(_temporal_attention_kernel)[grid](
            q, k, v, out, b * s, q.stride(1), k.stride(1), v.stride(1), out.stride(1),
            QK_SCALE=math.log2(math.e) / math.sqrt(head_dim), SEQ=s, HEAD_DIM=head_dim)
        return out

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
