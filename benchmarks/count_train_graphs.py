#!/usr/bin/env python
"""Count the graphs that torch.compile of the full-size training UNet makes (regional or full, with or without
gradient checkpointing), list its graph breaks, and time their tracing.

Runs on the CPU with the full-size VideoCrafter2 architecture (random weights) at a small resolution, with the
``aot_eager`` backend: dynamo and AOTAutograd trace every graph (forward and backward) as inductor would be given
them, without generating kernels. Each block class and shape is one graph, whatever the resolution, so the count is
the full-size run's; on a GPU inductor then compiles each of them.

    python benchmarks/count_train_graphs.py --frames 2 --rewrites
    python benchmarks/count_train_graphs.py --frames 2 --rewrites --mode full --checkpointing
"""

from __future__ import annotations

import argparse
import time

from count_train_ops import full_size_pipeline, small_training_config  # benchmarks/count_train_ops.py
from torch._dynamo.utils import counters

import customcrafter.training.trainer as trainer
from customcrafter.performance import compile_unet, prepare_unet_for_compiled_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rewrites", action="store_true", help="as compile_rewrites: channels-last and layer rewrites")
    parser.add_argument("--mode", choices=["regional", "full"], default="regional")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on, as the trainer "
                                                                     "sets it: before compiling")
    args = parser.parse_args()

    pipe = full_size_pipeline()
    if args.checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    if args.rewrites:
        prepare_unet_for_compiled_training(pipe.unet)
    compile_unet(pipe.unet, args.mode, backend="aot_eager")
    marks = []
    collate = trainer._collate

    def marking_collate(*a, **k):  # called at the start of every step
        marks.append((time.perf_counter(), counters["stats"]["unique_graphs"]))
        return collate(*a, **k)

    trainer._collate = marking_collate
    config = small_training_config(args.frames, args.steps)
    trainer.train(config.model_copy(update={"gradient_checkpointing": args.checkpointing}), pipe=pipe)
    marks.append((time.perf_counter(), counters["stats"]["unique_graphs"]))
    print(f"{args.mode} compile of the full-size training UNet ({args.frames} frames, rewrites {args.rewrites}, "
          f"gradient checkpointing {args.checkpointing}):")
    print("  graphs traced by the end of each step:", [graphs for _, graphs in marks[1:]])
    print("  seconds per step:", [round(b[0] - a[0], 1) for a, b in zip(marks[:-1], marks[1:], strict=True)])
    print("  graph breaks:", dict(counters["graph_break"]) or "none")


if __name__ == "__main__":
    main()
