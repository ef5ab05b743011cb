"""A Triton kernel for a memory-bound spot of the UNet at inference (CUDA; a plain PyTorch path elsewhere).

``temporal_attention(q, k, v, heads)``: attention over short sequences (the temporal transformers' 16 frames),
read straight from and written straight to the projections' ``(batch, frames, channels)`` layout. One program
takes several whole sequences of one head as a ``(rows, head_dim)`` tile, does the ``QK^T`` and ``PV`` products as
one block-diagonal tile product each (the off-diagonal blocks are masked out: a few wasted multiply-adds, which
the tensor cores have to spare) and keeps the scores on chip. SDPA's kernels are built for long sequences: at 16
frames they run at a fraction of the memory bandwidth (``benchmarks/micro_ops.py``).

It is registered with ``torch.library.triton_op``, so ``torch.compile`` sees through it. It is inference-only (no
backward): callers fall back to PyTorch whenever a gradient is needed, as they do on the CPU.
``temporal_attention_reference`` is the exact PyTorch formulation it replaces.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

__all__ = ["HAS_TRITON", "temporal_attention", "temporal_attention_reference", "temporal_attention_supported"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.bfloat16, torch.float16)


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
    return all(t.stride(2) == 1 and t.stride(0) == s * t.stride(1) for t in (q, k, v))


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
                                   qk_scale, SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
        seqs = BLOCK_R // SEQ  # whole sequences per program (rows past seqs * SEQ are padding)
        local = tl.arange(0, BLOCK_R)
        rows = tl.program_id(0) * seqs * SEQ + local
        valid = (local < seqs * SEQ) & (rows < n_rows)
        cols = tl.program_id(1) * HEAD_DIM + tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=valid[:, None], other=0.0)
        k = tl.load(k_ptr + rows[:, None] * stride_k + cols[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + rows[:, None] * stride_v + cols[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * qk_scale  # log2 domain: qk_scale includes log2(e)
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
            return (triton.cdiv(b, meta["BLOCK_R"] // s), heads)  # whole sequences per program, one head

        wrap_triton(_temporal_attention_kernel)[grid](
            q, k, v, out, b * s, q.stride(1), k.stride(1), v.stride(1), out.stride(1),
            math.log2(math.e) / math.sqrt(head_dim), SEQ=s, HEAD_DIM=head_dim)
        return out
