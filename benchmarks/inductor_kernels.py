#!/usr/bin/env python
"""Probe: how far each kernel inductor generates for the compiled UNet is from its memory-bandwidth floor.

Compiles the full-size UNet as the product samples with it (random weights, no adapter: sampling fuses the subject
LoRA into the weights; the layer rewrites, channels-last, ``torch.compile`` of the whole forward) with inductor's
``benchmark_kernel`` switched on, so that every generated kernel carries its byte count. Then:

1. one CFG forward (the latents once, the two contexts, as the pipeline calls it) under the profiler: how many
   times each kernel runs per forward and for how long inside the forward;
2. the bytes each inductor kernel reads and writes (inductor's own count) and its achieved GB/s in the forward
   (and, for kernels compiled in this process, its time alone, replayed in a CUDA graph);
3. the copy bandwidth of the card (a 1 GiB device-to-device copy): the floor of a kernel is its bytes over this.

The table is sorted by the time each kernel loses against its floor per forward (calls x (time in the forward -
floor)): where a rewrite or a kernel of our own would pay most. cuBLAS/cuDNN/our Triton ops are listed by their
time in the forward only (no byte count), and the aten ops that launch cuBLAS / cuDNN / attention kernels by input
shape, with their TFLOP/s. Nothing here changes the product.

    python benchmarks/inductor_kernels.py --out inductor_kernels.json
    python benchmarks/inductor_kernels.py --speed fused_geglu=False --out old.json
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import build_pipeline, cfg_forward_inputs, kernel_events, sync  # noqa: E402

from customcrafter.performance import SpeedConfig, optimize_pipeline  # noqa: E402


def copy_bandwidth_gbps(gib: int = 1) -> float:
    """Device-to-device copy of ``gib`` GiB, best of 10: bytes read + written per second, in GB/s."""
    src = torch.empty(gib * 2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        sync()
        times.append(start.elapsed_time(end))
    return 2 * src.numel() / (min(times) / 1e3) / 1e9


#: aten ops launched by the compiled graph whose kernels are cuBLAS / cuDNN / FlashAttention: timed per input shape
EXTERN_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution",
              "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention",
              "aten::_scaled_dot_product_efficient_attention")


def op_flops(op: str, shapes: list) -> float | None:
    """Multiply-add FLOPs of one call from its input shapes (convolutions: stride 1 and 'same' padding assumed)."""
    dims = [s for s in shapes if isinstance(s, list | tuple) and s]
    try:
        if op == "aten::mm":
            (m, k), (_, n) = dims[0], dims[1]
            return 2.0 * m * k * n
        if op == "aten::addmm":
            (m, k), (_, n) = dims[1], dims[2]
            return 2.0 * m * k * n
        if op == "aten::bmm":  # (the out= tensor, where given, comes after the operands)
            (b, m, k), (_, _, n) = dims[0], dims[1]
            return 2.0 * b * m * k * n
        if op == "aten::baddbmm":
            (b, m, k), (_, _, n) = dims[1], dims[2]
            return 2.0 * b * m * k * n
        if op == "aten::convolution":
            x, w = dims[0], dims[1]
            positions = x[0] * (x[2] * x[3] * (x[4] if len(x) == 5 else 1))
            return 2.0 * positions * w[0] * (w[1] * w[2] * w[3] * (w[4] if len(w) == 5 else 1))
        if "scaled_dot_product" in op:
            (b, h, lq, d), (_, _, lk, _) = dims[0], dims[1]
            return 4.0 * b * h * lq * lk * d
    except (ValueError, IndexError, TypeError):
        return None
    return None


def profile_forward(unet, frames: int, height: int, width: int, forwards: int = 3):
    """One CFG forward (the latents once, the two contexts) under the profiler, ``forwards`` times. Returns kernel name
    -> (launches, µs) per forward, and the extern ops (``EXTERN_OPS``) per input shape: calls and µs per forward,
    GFLOP and TFLOP/s per call."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    x, t, context = cfg_forward_inputs(unet, frames, height, width)
    with torch.no_grad():
        for _ in range(3):
            unet(x, t, context, fps=16)
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(forwards):
                unet(x, t, context, fps=16)
            sync()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = kernel_events(trace)
    by_name: dict[str, list[float]] = {}
    for event in events:
        by_name.setdefault(event["name"], []).append(event["dur"])
    kernels = {name: (len(durations) / forwards, sum(durations) / forwards) for name, durations in by_name.items()}
    ops = []
    for avg in prof.key_averages(group_by_input_shape=True):
        if avg.key not in EXTERN_OPS or not avg.count:
            continue
        us = avg.device_time_total / forwards
        calls = avg.count / forwards
        flops = op_flops(avg.key, avg.input_shapes)
        ops.append({"op": avg.key, "shapes": str(avg.input_shapes), "calls_per_forward": round(calls, 2),
                    "ms_per_forward": round(us / 1e3, 4), "us_per_call": round(us / calls, 2),
                    "gflop_per_call": None if flops is None else round(flops / 1e9, 2),
                    "tflops": None if flops is None else round(flops * calls / (us / 1e6) / 1e12, 1)})
    ops.sort(key=lambda r: -r["ms_per_forward"])
    return kernels, ops


def inductor_kernels() -> dict[str, tuple[object, object | None]]:
    """Kernel name -> (its ``CachingAutotuner``, the kernel's own generated module or None) for every inductor kernel
    loaded in this process. Compiled with ``benchmark_kernel`` on, each carries inductor's count of the bytes it reads
    and writes; a kernel compiled in this process also has its own module, which rebuilds its arguments (those
    compiled by worker processes are reached through the graph's wrapper module only)."""
    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    found: dict[str, tuple[object, object | None]] = {}
    for module in PyCodeCache.modules:
        kernels = {name: value for name, value in vars(module).items()
                   if name.startswith("triton_") and isinstance(value, CachingAutotuner)}
        own = len(kernels) == 1 and hasattr(module, "get_args") and hasattr(module, "call")
        for name, kernel in kernels.items():
            if own or name not in found:
                found[name] = (kernel, module if own else None)
    return found


def alone_ms(module, name: str) -> float:
    """ms per call of one generated kernel replayed in a CUDA graph on arguments of its real shapes."""
    import triton.testing

    args = module.get_args()
    module.call(args)  # autotunes if it has several configs
    sync()
    try:
        return triton.testing.do_bench_cudagraph(lambda: module.call(args), rep=30, return_mode="median")
    except RuntimeError:  # a kernel that cannot be captured: timed back to back instead
        return triton.testing.do_bench(lambda: module.call(args), rep=30, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", nargs="*", default=[], metavar="KEY=VALUE",
                        help="SpeedConfig fields on top of compile='full', compile_mode='default' (Python literals)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--top", type=int, default=40, help="rows printed")
    parser.add_argument("--out", required=True)
    parser.add_argument("--sources", default=None, help="also write the Triton source of the top rows to this file")
    args = parser.parse_args()

    import torch._inductor.config as inductor_config

    inductor_config.benchmark_kernel = True  # generated kernels carry their byte counts (and get_args())
    started = time.perf_counter()
    pipe = build_pipeline(None)  # no adapter: sampling fuses the subject LoRA into the weights (DWVSS phases)
    speed = {key: ast.literal_eval(value) for key, value in (entry.split("=", 1) for entry in args.speed)}
    optimize_pipeline(pipe, SpeedConfig(**{"compile": "full", "compile_mode": "default"} | speed))
    launches, extern_ops = profile_forward(pipe.unet, args.frames, args.height, args.width)
    compile_s = time.perf_counter() - started
    bandwidth = copy_bandwidth_gbps()
    print(json.dumps({"compile_and_profile_s": round(compile_s, 1), "copy_gbps": round(bandwidth)}), flush=True)

    kernels = inductor_kernels()
    rows = []
    for name, (calls, us) in launches.items():
        row = {"name": name, "calls_per_forward": round(calls, 2), "ms_per_forward": round(us / 1e3, 4),
               "us_per_call_in_forward": round(us / calls, 2)}
        kernel, module = kernels.get(name, (None, None))
        gb = kernel.inductor_meta.get("kernel_num_gb") if kernel is not None else None
        if gb is not None:
            floor_us = gb / bandwidth * 1e6
            row |= {"mb": round(gb * 1e3, 2), "gbps_in_forward": round(gb / (row["us_per_call_in_forward"] / 1e6)),
                    "floor_us": round(floor_us, 2), "ms_over_floor_per_forward": round((us - calls * floor_us) / 1e3, 4)}
            if module is not None:
                row["us_alone"] = round(alone_ms(module, name) * 1e3, 2)
        rows.append(row)
    generated = [r for r in rows if "floor_us" in r]
    generated.sort(key=lambda r: -r["ms_over_floor_per_forward"])
    others = sorted((r for r in rows if "floor_us" not in r), key=lambda r: -r["ms_per_forward"])
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "speed": speed,
              "copy_gbps": round(bandwidth), "gpu_ms_per_forward": round(sum(r["ms_per_forward"] for r in rows), 3),
              "generated_ms_per_forward": round(sum(r["ms_per_forward"] for r in generated), 3),
              "generated_floor_ms_per_forward": round(sum(r["calls_per_forward"] * r["floor_us"]
                                                          for r in generated) / 1e3, 3),
              "generated_kernels": generated, "other_kernels": others, "extern_ops_by_shape": extern_ops,
              "wall_s": round(time.perf_counter() - started, 1)}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if not k.endswith(("kernels", "by_shape"))}), flush=True)
    for row in generated[:args.top]:
        print(f"{row['ms_over_floor_per_forward']:7.3f} ms over floor | {row['calls_per_forward']:5.1f}x "
              f"{row['us_per_call_in_forward']:8.1f} us (floor {row['floor_us']:7.1f}, "
              f"{row['mb']:8.1f} MB, {row['gbps_in_forward']:5d} GB/s) {row['name'][:100]}")
    if args.sources:
        texts = [f"# {row['name']}: {row['calls_per_forward']}x {row['us_per_call_in_forward']} us, floor "
                 f"{row['floor_us']} us\n{getattr(kernels[row['name']][0].fn, 'src', '')}" for row in generated[:args.top]]
        Path(args.sources).write_text("\n\n".join(texts))
    for row in others[:15]:
        print(f"{row['ms_per_forward']:7.3f} ms | {row['calls_per_forward']:5.1f}x {row['name'][:100]}")
    for row in extern_ops[:args.top]:
        print(f"{row['ms_per_forward']:7.3f} ms | {row['calls_per_forward']:5.1f}x {row['us_per_call']:8.1f} us "
              f"{row['tflops']} TFLOP/s {row['op']} {row['shapes'][:120]}")


if __name__ == "__main__":
    main()
