#!/usr/bin/env python
"""Profile CustomCrafter training steps on a GPU: where the time goes (CPU-side operator overhead vs GPU kernels).

    python benchmarks/profile_train.py --frames 4 --steps 8
    python benchmarks/profile_train.py --frames 16 --steps 8 --cuda-graphs --compile full --examples
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from gpu import benchmark_train_config, build_pipeline  # benchmarks/gpu.py
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", default="bf16")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--compile", choices=["none", "regional", "full"], default="none")
    parser.add_argument("--frozen-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--examples", action="store_true", help="train from materialised examples (as the pipeline)")
    args = parser.parse_args()

    from customcrafter.training.trainer import train

    tmp = Path(tempfile.mkdtemp())
    pipe = build_pipeline(None)
    config = benchmark_train_config(pipe, tmp, args.frames, steps=3, mixed_precision=args.mixed_precision,
                                    gradient_checkpointing=args.checkpointing, cuda_graphs=args.cuda_graphs,
                                    compile=args.compile, frozen_dtype=args.frozen_dtype, examples=args.examples)
    train(config, pipe=pipe)  # warm-up (cuDNN autotuning, allocator)
    config = config.model_copy(update={"steps": args.steps, "output_dir": str(tmp / "run2"), "log_every": args.steps})
    pipe = build_pipeline(None)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        train(config, pipe=pipe)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))
    print(events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=50))
    cuda_total = sum(e.self_device_time_total for e in events) / 1e6
    print(f"wall {wall:.2f} s for {args.steps} steps (+ setup); GPU kernel time {cuda_total:.2f} s")
    # the trainer's named ranges (trainer.DiffusionLoss.forward and the loop): GPU time per step in each
    for event in sorted((e for e in events if e.key.startswith("customcrafter.")), key=lambda e: e.key):
        print(f"  {event.key:<32} GPU {event.device_time_total / 1e3 / args.steps:8.2f} ms/step  "
              f"CPU {event.cpu_time_total / 1e3 / args.steps:8.2f} ms/step  ({event.count} calls)")


if __name__ == "__main__":
    main()
