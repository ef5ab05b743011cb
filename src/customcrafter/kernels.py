"""Triton kernels for memory-bound spots of the UNet at inference (CUDA; a plain PyTorch path elsewhere).

``temporal_attention(q, k, v, heads)``: attention over short sequences (the temporal transformers' 16 frames),
read straight from and written straight to the projections' ``(batch, frames, channels)`` layout. One program
takes several whole sequences of one head as a ``(rows, head_dim)`` tile, does the ``QK^T`` and ``PV`` products as
one block-diagonal tile product each (the off-diagonal blocks are masked out: a few wasted multiply-adds, which
the tensor cores have to spare) and keeps the scores on chip. SDPA's kernels are built for long sequences: at 16
frames they run at a fraction of the memory bandwidth (``benchmarks/micro_ops.py``).

``gated_gelu_linear(x, weight_gate, bias_gate, value, bias_value)``: ``(value + bias_value) * gelu(x @ weight_gate.T +
bias_gate)`` (exact erf GELU), the second half of diffusers' ``GEGLU`` (``h, gate = proj(x).chunk(2, -1);
h * gelu(gate)``) with the value half ``x @ W[:N].T`` left to cuBLAS and the gate half ``W[N:]`` done by a Triton
GEMM whose epilogue reads the value tile and writes only the gated product. The 2N-wide output of the feed-forward
input projection is the largest tensor of the UNet's transformer blocks (~420 MB per level-0 layer at 16 frames, CFG
batch 2); this way it never reaches memory: the gating pass that reads it back and the half it discards are gone.

Both are registered with ``torch.library.triton_op``, so ``torch.compile`` sees through them. They are
inference-only (no backward): callers fall back to PyTorch whenever a gradient is needed, as they do on the CPU.
``temporal_attention_reference`` and ``gated_gelu_linear_reference`` are the PyTorch formulations they replace.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

__all__ = ["HAS_TRITON", "gated_gelu_linear", "gated_gelu_linear_reference", "gated_gelu_linear_supported",
           "temporal_attention", "temporal_attention_reference", "temporal_attention_supported"]

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


def gated_gelu_linear_reference(x: torch.Tensor, weight_gate: torch.Tensor, bias_gate: torch.Tensor | None,
                                value: torch.Tensor, bias_value: torch.Tensor | None) -> torch.Tensor:
    """``(value + bias_value) * gelu(x @ weight_gate.T + bias_gate)`` in the inputs' dtype, as diffusers' GEGLU."""
    gate = F.gelu(F.linear(x, weight_gate, bias_gate))
    return (value if bias_value is None else value + bias_value) * gate


def _flattens_to_rows(t: torch.Tensor) -> bool:
    """Whether ``t`` is ``(rows, last dim)`` as a view (no copy), its last dim contiguous."""
    if t.stride(-1) != 1:
        return False
    expected = None  # the stride the next outer dim needs to continue the rows evenly
    for size, stride in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1]), strict=True):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return False
        expected = stride * size
    return True


def gated_gelu_linear_supported(x: torch.Tensor, weight_gate: torch.Tensor, bias_gate: torch.Tensor | None,
                                value: torch.Tensor, bias_value: torch.Tensor | None) -> bool:
    """Whether the Triton kernel takes these inputs: CUDA, bf16/fp16 throughout, no gradient, K and N multiples of
    16, a row-major weight, x and value flattening to rows as views, contiguous biases, 32-bit offsets."""
    tensors = [t for t in (x, weight_gate, bias_gate, value, bias_value) if t is not None]
    if not (HAS_TRITON and x.is_cuda and x.dtype in _DTYPES and _no_grad(*tensors)):
        return False
    if any(t.dtype != x.dtype or t.device != x.device for t in tensors) or weight_gate.dim() != 2:
        return False
    n, k = weight_gate.shape
    if k % 16 or n % 16 or x.shape[-1] != k or value.shape != (*x.shape[:-1], n) or not x.numel() * n:
        return False
    if any(b is not None and (b.shape != (n,) or b.stride(0) != 1) for b in (bias_gate, bias_value)):
        return False
    if not (weight_gate.is_contiguous() and _flattens_to_rows(x) and _flattens_to_rows(value)):
        return False
    return max(_span(x), _span(value)) < 2 ** 31  # the kernel's offsets are 32-bit


def _span(t: torch.Tensor) -> int:
    """One past the largest element offset of ``t`` from its first element."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))


def gated_gelu_linear(x: torch.Tensor, weight_gate: torch.Tensor, bias_gate: torch.Tensor | None,
                      value: torch.Tensor, bias_value: torch.Tensor | None) -> torch.Tensor:
    """``gated_gelu_linear_reference`` through the Triton kernel where it applies, else through PyTorch."""
    if gated_gelu_linear_supported(x, weight_gate, bias_gate, value, bias_value):
        n, k = weight_gate.shape
        out = torch.ops.customcrafter.gated_gelu_linear(x.view(-1, k), weight_gate, bias_gate, value.view(-1, n),
                                                        bias_value)
        return out.view(*x.shape[:-1], n)
    return gated_gelu_linear_reference(x, weight_gate, bias_gate, value, bias_value)


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

    _GG_BLOCK_K = 64  # every config's BLOCK_K: the K loop is unmasked where K is a multiple of it

    # (BLOCK_M, BLOCK_N, num_stages, num_warps): tiles for Hopper's bf16 wgmma
    @triton.autotune(configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": _GG_BLOCK_K, "GROUP_M": 8},
                                            num_stages=stages, num_warps=warps)
                              for bm, bn, stages, warps in ((128, 128, 4, 8), (128, 256, 3, 8), (256, 128, 3, 8),
                                                            (128, 128, 3, 4), (64, 128, 4, 4))],
                     key=["M", "N", "K"])
    @triton.jit
    def _gated_gelu_linear_kernel(x_ptr, w_ptr, bg_ptr, v_ptr, bv_ptr, o_ptr, M, N, K, stride_x, stride_w,
                                  stride_v, stride_o, HAS_BG: tl.constexpr, HAS_BV: tl.constexpr,
                                  EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # grouped ordering: GROUP_M row tiles sweep the column tiles together, so their x rows and the weight's
        # column tiles are reused from L2
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
        pid_n = (pid % (GROUP_M * tiles_n)) // group_m
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        # ragged M/N edges: load rows/columns wrapped into range (their results are never stored) so the K loop
        # needs no row or column masks
        rows_in = tl.max_contiguous(tl.multiple_of(rows % M, BLOCK_M), BLOCK_M)
        cols_in = tl.max_contiguous(tl.multiple_of(cols % N, BLOCK_N), BLOCK_N)
        x_ptrs = x_ptr + rows_in[:, None] * stride_x + ks[None, :]
        w_ptrs = w_ptr + cols_in[None, :] * stride_w + ks[:, None]  # a (BLOCK_K, BLOCK_N) tile of weight.T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_in = ks < K - k * BLOCK_K
                a = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_in[:, None], other=0.0)
            acc = tl.dot(a, b, acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        # epilogue in fp32: exact GELU of the gate times the value tile (+ its bias), one rounding at the store
        col_in = cols < N
        if HAS_BG:
            acc += tl.load(bg_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        gelu = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        mask = (rows < M)[:, None] & col_in[None, :]
        v = tl.load(v_ptr + rows[:, None] * stride_v + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BV:
            v += tl.load(bv_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptr + rows[:, None] * stride_o + cols[None, :], (v * gelu).to(o_ptr.dtype.element_ty), mask=mask)

    @triton_op("customcrafter::gated_gelu_linear", mutates_args=())
    def _gated_gelu_linear_op(x: torch.Tensor, weight_gate: torch.Tensor, bias_gate: torch.Tensor | None,
                              value: torch.Tensor, bias_value: torch.Tensor | None) -> torch.Tensor:
        m, k = x.shape
        n = weight_gate.shape[0]
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        # an absent bias is never read: an input stands in for its pointer (not out, which the kernel writes)
        wrap_triton(_gated_gelu_linear_kernel)[grid](
            x, weight_gate, weight_gate if bias_gate is None else bias_gate, value,
            weight_gate if bias_value is None else bias_value, out, m, n, k,
            x.stride(0), weight_gate.stride(0), value.stride(0), out.stride(0),
            HAS_BG=bias_gate is not None, HAS_BV=bias_value is not None, EVEN_K=k % _GG_BLOCK_K == 0)
        return out
