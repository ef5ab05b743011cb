"""Fused Triton kernels for two memory-bound spots of the UNet at inference (CUDA; a plain PyTorch path elsewhere).

- ``temporal_attention(q, k, v, heads)``: attention over short sequences (the temporal transformers' 16 frames),
  read straight from and written straight to the projections' ``(batch, frames, channels)`` layout. One program
  takes several whole sequences of one head as a ``(rows, head_dim)`` tile, does the ``QK^T`` and ``PV`` products
  as one block-diagonal tile product each (the off-diagonal blocks are masked out: a few wasted multiply-adds,
  which the tensor cores have to spare) and keeps the scores on chip. SDPA's kernels are built for long
  sequences: at 16 frames they run at a fraction of the memory bandwidth (``benchmarks/micro_ops.py``).
- ``geglu(x, weight, bias)``: the feed-forward's ``GEGLU`` — ``h, g = (x @ W^T + b).chunk(2); h * gelu(g)`` — as
  one matrix product with two accumulators and the gating in its epilogue, so the ``2 x`` wide product never goes
  to memory.

Both are registered with ``torch.library.triton_op``, so ``torch.compile`` sees through them. They are
inference-only (no backward): callers fall back to the PyTorch path whenever a gradient is needed, as they do on
the CPU. The references (``*_reference``) are the exact PyTorch formulations they replace.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

__all__ = ["HAS_TRITON", "temporal_attention", "temporal_attention_reference", "geglu", "geglu_reference",
           "temporal_attention_supported", "geglu_supported"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.bfloat16, torch.float16)


def temporal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention over dim 1 of ``(batch, seq, channels)`` tensors, as diffusers' SDPA processor."""
    b, s, c = q.shape
    q, k, v = (t.reshape(b, s, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, c)


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """diffusers' ``GEGLU`` (exact-erf GELU on the second half of the projection, times the first half)."""
    h, g = F.linear(x, weight, bias).chunk(2, dim=-1)
    return h * F.gelu(g)


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


def geglu_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the fused GEGLU kernel takes these inputs: CUDA, bf16/fp16 throughout, no gradient, an even output
    width and an input width that is a multiple of 16."""
    if not (HAS_TRITON and x.is_cuda and x.dtype in _DTYPES and weight.dtype == x.dtype):
        return False
    if bias is not None and bias.dtype != x.dtype:
        return False
    return (_no_grad(x, weight, *(() if bias is None else (bias,))) and weight.dim() == 2
            and weight.shape[0] % 2 == 0 and weight.shape[1] == x.shape[-1] and x.shape[-1] % 16 == 0)


def temporal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``temporal_attention_reference`` through the Triton kernel where it applies, else through PyTorch."""
    if temporal_attention_supported(q, k, v, heads):
        return torch.ops.customcrafter.temporal_attention(q, k, v, heads)
    return temporal_attention_reference(q, k, v, heads)


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``geglu_reference`` through the fused Triton kernel where it applies, else through PyTorch."""
    if geglu_supported(x, weight, bias):
        return torch.ops.customcrafter.geglu(x, weight, bias)
    return geglu_reference(x, weight, bias)


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
        n_seqs = b

        def grid(meta):
            return (triton.cdiv(n_seqs, meta["BLOCK_R"] // s), heads)

        wrap_triton(_temporal_attention_kernel)[grid](
            q, k, v, out, b * s, q.stride(1), k.stride(1), v.stride(1), out.stride(1),
            math.log2(math.e) / math.sqrt(head_dim), SEQ=s, HEAD_DIM=head_dim)
        return out

    @triton.autotune(configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": kk, "GROUP_M": 8},
                                            num_warps=w, num_stages=st)
                              for m, n, kk, w, st in ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
                                                      (64, 128, 64, 4, 4), (128, 128, 32, 8, 4),
                                                      (256, 64, 64, 8, 3), (128, 256, 64, 8, 3))],
                     key=["M", "N", "K"])
    @triton.jit
    def _geglu_kernel(x_ptr, w_ptr, b_ptr, o_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
        # grouped launch order: programs that share a weight tile run close together (L2 reuse)
        pid = tl.program_id(0)
        grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * grid_n)
        first_m = group * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
        pid_n = (pid % (GROUP_M * grid_n)) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok, n_ok = rm < M, rn < N
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        h_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None]  # W[:N]^T tile: (BLOCK_K, BLOCK_N)
        g_ptrs = h_ptrs + N * stride_wn                          # W[N:]^T tile
        acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + rk) < K
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wh = tl.load(h_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            wg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_h = tl.dot(x, wh, acc_h)
            acc_g = tl.dot(x, wg, acc_g)
            x_ptrs += BLOCK_K
            h_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
        if HAS_BIAS:
            acc_h += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_g += tl.load(b_ptr + N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = acc_h * (0.5 * acc_g * (1.0 + tl.erf(acc_g * 0.7071067811865476)))
        tl.store(o_ptr + rm[:, None] * stride_om + rn[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton_op("customcrafter::geglu", mutates_args=())
    def _geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        weight = weight.contiguous()
        m, n = x2.shape[0], weight.shape[0] // 2
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        wrap_triton(_geglu_kernel)[grid](x2, weight, weight if bias is None else bias, out, m, n, k,
                                         x2.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None)
        return out.reshape(*x.shape[:-1], n)
