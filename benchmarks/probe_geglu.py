#!/usr/bin/env python
"""Probe: the feed-forward's GEGLU (``value, gate = x @ W.T + b`` split in halves, ``value * gelu(gate)``) as one
Triton GEMM whose epilogue does the gating, so that the 2N-wide projection never reaches memory, against what the
compiled UNet ran before (cuBLAS GEMM + inductor's gating pass), and the product's kernel (``customcrafter.kernels.
geglu``, which took the persistent TMA form from here; its GELU is the gate form "poly" since session 26, libdevice's
"erf" before). Two kernel forms, each over a sweep of tile
configurations: plain pointer loads (one program per output tile), and device-side TMA descriptors in a persistent
loop (optionally warp-specialized). Replays in CUDA graphs (``micro_ops.graph_ms``).

    python benchmarks/probe_geglu.py --out geglu.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from micro_ops import graph_ms  # noqa: E402

from customcrafter import kernels  # noqa: E402
from customcrafter.fusions import unfused_bias_linear  # noqa: E402
from customcrafter.kernels import _geglu_tile, gelu_polynomial_triton  # noqa: E402  (the product kernel's own)

# (name, M tokens, K, N of the gated output): feed-forward input projections, CFG batch 2 x 16 frames at 320x512
SHAPES = [("L0", 81920, 320, 1280), ("L1", 20480, 640, 2560), ("L2", 5120, 1280, 5120), ("L3", 1280, 1280, 5120)]


@triton.jit
def _gelu_gate(acc_v, acc_g, b_ptr, rn, N, GATE: tl.constexpr):
    value = acc_v + tl.load(b_ptr + rn).to(tl.float32)[None, :]
    gate = acc_g + tl.load(b_ptr + N + rn).to(tl.float32)[None, :]
    if GATE == "erf":  # libdevice erf
        return value * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
    if GATE == "as":  # erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7): one exp2, one reciprocal
        z = tl.abs(gate) * 0.7071067811865476
        t = 1.0 / (1.0 + 0.3275911 * z)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        q = poly * tl.exp2(-1.4426950408889634 * z * z)  # 1 - erf(|z|)
        return value * (0.5 * gate * tl.where(gate >= 0, 2.0 - q, q))
    if GATE == "as_fast":  # the same with the approximate reciprocal (div.full.f32, 2 ulp) instead of IEEE division
        z = tl.abs(gate) * 0.7071067811865476
        t = tl.math.fdiv(1.0, 1.0 + 0.3275911 * z, ieee_rounding=False)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        q = poly * tl.exp2(-1.4426950408889634 * z * z)
        return value * (0.5 * gate * tl.where(gate >= 0, 2.0 - q, q))
    if GATE == "poly":  # the product's GELU (customcrafter.kernels.GELU_POLYNOMIAL: ten multiply-adds, no erf)
        return value * gelu_polynomial_triton(gate)
    if GATE == "tanh":  # GELU's tanh approximation with the hardware tanh (a different function: diagnostic)
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        th = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [inner], dtype=tl.float32, is_pure=True,
                                       pack=1)
        return value * (0.5 * gate * (1.0 + th))
    return value * gate  # "none": no GELU at all (diagnostic: what the epilogue's arithmetic costs)


@triton.jit
def geglu_pointer_kernel(x_ptr, w_ptr, b_ptr, o_ptr, M, N, K: tl.constexpr, stride_xm, stride_wn, stride_om,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                         GATE: tl.constexpr):
    pid_m, pid_n = _geglu_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = x_ptr + tl.where(rm < M, rm, 0)[:, None] * stride_xm + rk[None, :]
    v_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None]
    g_ptrs = v_ptrs + N * stride_wn
    acc_v = tl.zeros((BM, BN), tl.float32)
    acc_g = tl.zeros((BM, BN), tl.float32)
    for _ in range(K // BK):
        a = tl.load(a_ptrs)
        acc_v = tl.dot(a, tl.load(v_ptrs), acc_v)
        acc_g = tl.dot(a, tl.load(g_ptrs), acc_g)
        a_ptrs += BK
        v_ptrs += BK
        g_ptrs += BK
    out = _gelu_gate(acc_v, acc_g, b_ptr, rn, N, GATE)
    tl.store(o_ptr + rm[:, None] * stride_om + rn[None, :], out.to(o_ptr.dtype.element_ty), mask=(rm < M)[:, None])


@triton.jit
def geglu_tma_kernel(x_ptr, w_ptr, b_ptr, o_ptr, M, N, K: tl.constexpr, stride_xm, stride_wn, stride_om,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                     NUM_PROGRAMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, GATE: tl.constexpr):
    x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BM, BK])
    w_desc = tl.make_tensor_descriptor(w_ptr, [2 * N, K], [stride_wn, 1], [BN, BK])
    o_desc = tl.make_tensor_descriptor(o_ptr, [M, N], [stride_om, 1], [BM, BN])
    tiles = tl.cdiv(M, BM) * (N // BN)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _geglu_tile(tile, M, N, BM, BN, GROUP_M)
        acc_v = tl.zeros((BM, BN), tl.float32)
        acc_g = tl.zeros((BM, BN), tl.float32)
        for ki in range(K // BK):
            a = x_desc.load([pid_m * BM, ki * BK])
            acc_v = tl.dot(a, w_desc.load([pid_n * BN, ki * BK]).T, acc_v)
            acc_g = tl.dot(a, w_desc.load([N + pid_n * BN, ki * BK]).T, acc_g)
        rn = pid_n * BN + tl.arange(0, BN)
        out = _gelu_gate(acc_v, acc_g, b_ptr, rn, N, GATE)
        o_desc.store([pid_m * BM, pid_n * BN], out.to(o_desc.dtype))


def geglu_reference(x, weight, bias):
    """What the UNet computes (``fusions.unfused_bias_linear`` then diffusers' GEGLU)."""
    value, gate = unfused_bias_linear(x, weight, bias).chunk(2, dim=-1)
    return value * F.gelu(gate)


def launch(form: str, x, weight, bias, cfg: dict, wrap=lambda kernel: kernel):
    """Launch ``form`` with ``cfg``; ``wrap=torch.library.wrap_triton`` inside a ``triton_op``."""
    m, k = x.shape
    n = weight.shape[0] // 2
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    common = dict(BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=cfg["GROUP_M"], num_warps=cfg["warps"],
                  num_stages=cfg["stages"], GATE=cfg.get("gate", "erf"))
    tiles = triton.cdiv(m, cfg["BM"]) * (n // cfg["BN"])
    if form == "pointer":
        wrap(geglu_pointer_kernel)[(tiles,)](x, weight, bias, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
                                       **common)
    else:  # "tma": persistent, one program per SM ("tma_2sm": two, if they fit); "tma_grid": one per output tile
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        programs = {"tma": sms, "tma_2sm": 2 * sms}.get(form, tiles)
        wrap(geglu_tma_kernel)[(programs,)](x, weight, bias, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
                                      NUM_PROGRAMS=programs, WARP_SPECIALIZE=cfg["ws"], **common)
    return out


# (BM, BN, BK, warps, stages): two fp32 accumulators of BM x BN, so 128 x 128 tiles need 8 warps; BK 32 with few
# stages leaves room in shared memory for two programs per SM (one's epilogue overlapping the other's MMAs)
TILES = {"pointer": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 128, 32, 8, 3), (64, 128, 64, 4, 3),
                     (64, 128, 32, 4, 3), (64, 256, 64, 8, 3), (64, 256, 32, 8, 3)],
         "tma": [(128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (128, 128, 32, 8, 6), (64, 128, 32, 4, 4),
                 (64, 256, 64, 8, 3)],
         "tma_grid": [(128, 128, 64, 8, 4), (128, 128, 32, 8, 3), (64, 128, 32, 4, 3)],
         # two persistent programs per SM, each small enough in registers and shared memory to share it with another,
         # so that one's epilogue (the GELU) can overlap the other's MMAs
         "tma_2sm": [(128, 64, 64, 8, 3), (128, 64, 32, 8, 4), (128, 64, 64, 4, 3), (128, 64, 32, 4, 4),
                     (64, 128, 64, 4, 3), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3)]}


GATES = ("erf", "poly", "as", "as_fast", "none", "tanh")


def configs(form: str, first_only: bool = False):
    for i, (bm, bn, bk, warps, stages) in enumerate(TILES[form][:1] if first_only else TILES[form]):
        for gate in ("poly", "none") if form == "tma_2sm" else GATES if i == 0 else ("erf", "poly"):
            yield {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "warps": warps, "stages": stages,
                   "ws": False, "gate": gate}


def compile_check(form: str, cfg: dict) -> dict:
    """Does the kernel run inside ``torch.compile`` as a ``triton_op`` (device-side TMA needs a scratch allocator
    that inductor must provide), with the same output as the eager launch?"""
    from torch.library import triton_op, wrap_triton

    name = f"probe_geglu::{form}_{cfg['BM']}_{cfg['BN']}_{cfg['warps']}_{cfg['stages']}_{int(cfg['ws'])}"

    @triton_op(name, mutates_args=())
    def op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return launch(form, x, weight, bias, cfg, wrap=wrap_triton)

    x = torch.randn(4096, 320, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(2560, 320, device="cuda", dtype=torch.bfloat16) / 18
    bias = torch.randn(2560, device="cuda", dtype=torch.bfloat16)
    try:
        compiled = torch.compile(lambda x: op(x * 2, weight, bias) + 1, fullgraph=True)
        got = compiled(x)  # before the eager launches set Triton's allocator: inductor must bring its own scratch
        kernels._ensure_scratch_allocator()
        want = launch(form, x * 2, weight, bias, cfg) + 1
        return {"form": form, "cfg": cfg, "equal": bool(torch.equal(got, want))}
    except Exception as exc:  # noqa: BLE001 - the probe reports what fails
        return {"form": form, "cfg": cfg, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def rel_err(out: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative error of the first rows of ``out`` against the float64 ``exact`` of those rows."""
    return float((out[:len(exact)].double() - exact).norm() / exact.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="geglu.json")
    parser.add_argument("--forms", nargs="+", default=["product", "pointer", "tma", "tma_grid"],
                        help="'product' = the kernel the UNet runs (customcrafter.kernels.geglu, autotuned)")
    parser.add_argument("--shapes", nargs="+", default=[name for name, *_ in SHAPES])
    parser.add_argument("--first-tile-only", action="store_true", help="only each form's first tile config, with "
                                                                         "every epilogue")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d"), "rows": []}
    report["compile_check"] = [compile_check(form, next(configs(form))) for form in ("pointer", "tma")]
    print(json.dumps(report["compile_check"]), flush=True)
    kernels._ensure_scratch_allocator()
    for shape in (s for s in SHAPES if s[0] in args.shapes):
        report["rows"].append(shape_row(*shape, forms=args.forms, first_only=args.first_tile_only))
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)


def form_results(form: str, x, weight, bias, exact, first_only: bool) -> list[dict]:
    results = []
    m, k = x.shape
    n = weight.shape[0] // 2
    for cfg in configs(form, first_only) if form != "product" else [{"op": "customcrafter.kernels.geglu"}]:
        run = (lambda: kernels.geglu(x, weight, bias)) if form == "product" else (
            lambda cfg=cfg: launch(form, x, weight, bias, cfg))
        try:
            ms = graph_ms(run)
            err = rel_err(run(), exact)
        except Exception as exc:  # noqa: BLE001 - a config the compiler refuses is a result, not a failure
            results.append({"cfg": cfg, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            continue
        results.append({"cfg": cfg, "ms": round(ms, 4), "tflops": round(4 * m * k * n / ms / 1e9, 1), "rel_err": err})
    return results


def shape_row(name: str, m: int, k: int, n: int, forms: list[str], first_only: bool = False) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(2 * n, k, device="cuda", generator=g) / math.sqrt(k)).to(torch.bfloat16)
    bias = (torch.randn(2 * n, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    exact = geglu_reference(x[:2048].double(), weight.double(), bias.double())
    compiled = torch.compile(geglu_reference)
    row = {"op": f"GEGLU {name}", "mkn": [m, k, n], "flop": 4 * m * k * n}
    row["now_ms"] = round(graph_ms(lambda: compiled(x, weight, bias)), 4)
    row["now_rel_err"] = rel_err(compiled(x, weight, bias), exact)
    row["cublas_2n_gemm_ms"] = round(graph_ms(lambda: x @ weight.t()), 4)
    for form in forms:
        results = form_results(form, x, weight, bias, exact, first_only)
        timed = [r for r in results if "ms" in r]
        best = min(timed, key=lambda r: r["ms"]) if timed else None
        row[form] = {"best": best, "all": results}
        print(json.dumps({"op": row["op"], "form": form, "now_ms": row["now_ms"], "best": best}), flush=True)
    return row


if __name__ == "__main__":
    main()
