#!/usr/bin/env python
"""Probe: the sampling loop with the compiled UNet's CUDA graphs captured by hand against torch.compile's CUDA graph
trees (``compile_mode="reduce-overhead"``, the product's default), in one process on one machine.

Session 27 measured the product's pipeline at 63.2 ms per step on one machine, and on another the same compiled UNet
replayed from a hand-captured graph in 61.6 ms with the pipeline around it at 62.4 ms per step. This probe puts both
on one machine, in order:

1. ``trees``: the UNet compiled with "reduce-overhead", as the product runs it: the pipeline per step (and per video:
   the intercept between 50 and 25 steps), the UNet call alone per step.
2. ``hand``: the same UNet recompiled with mode "default", its forward captured by hand in a CUDA graph per input
   layout (static input buffers; DWVSS's in-place weight updates reach the graph) and swapped in for the compiled
   call: the graph's replay alone, and the pipeline per step.

Each part also profiles a short pipeline call: GPU busy against idle time per step, the idle gaps (largest, and every
one over 0.5 ms in time order) with the kernels around them, CUDA graph launches, host calls that wait for the GPU;
``--trace-dir`` also writes that call's chrome trace (gzipped).

    python benchmarks/probe_graph_capture.py --out graph_capture.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import PROMPT, add_subject_lora, build_pipeline, cuda_ms, inductor_counters, sample  # noqa: E402

from customcrafter.dwvss import DWVSSConfig, dwvss_sampling  # noqa: E402
from customcrafter.performance import SpeedConfig, compile_unet, optimize_pipeline  # noqa: E402

VIDEO = dict(frames=16, height=320, width=512)


class HandGraphs:
    """The compiled call of ``unet`` replaced by CUDA graphs captured by hand, one per input layout."""

    def __init__(self, unet):
        self.compiled = unet._compiled_call_impl
        self.graphs: dict = {}

    def __call__(self, x, t, context, fps=None, return_dict=False):
        key = tuple((tuple(a.shape), a.dtype) for a in (x, t, context, fps))
        if key not in self.graphs:
            static = [a.clone() for a in (x, t, context, fps)]

            def forward():
                return self.compiled(static[0], static[1], static[2], fps=static[3], return_dict=False)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = forward()
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for buffer, value in zip(static, (x, t, context, fps), strict=True):
            buffer.copy_(value)
        graph.replay()
        return out


def profile_pipeline(pipe, embeds, steps: int, trace: str | None = None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    shape = dict(VIDEO, steps=steps)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = time.perf_counter()
        sample(pipe, output_type="latent", prompt_embeds=embeds, **shape)
        torch.cuda.synchronize()
        wall = time.perf_counter() - wall
    if trace:
        prof.export_chrome_trace(trace)  # open in chrome://tracing or https://ui.perfetto.dev
    events = prof.events()
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    busy, gaps, end = 0.0, [], None
    for index, kernel in enumerate(kernels):
        before = kernels[index - 1] if index else None
        start, stop = kernel.time_range.start, kernel.time_range.end
        if end is not None and start > end:
            gaps.append((start - end, end - kernels[0].time_range.start, before.name[:60], kernel.name[:60]))
        busy += max(0.0, stop - max(start, end or start))
        end = max(end or stop, stop)
    window = kernels[-1].time_range.end - kernels[0].time_range.start if kernels else 0.0
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    host_time = Counter()
    host_count = Counter()
    for e in host:
        host_time[e.name] += e.cpu_time_total
        host_count[e.name] += 1
    waits = {name: {"count": host_count[name], "ms": round(host_time[name] / 1e3, 3)} for name in host_count
             if any(key in name for key in ("ynchronize", "cudaMemcpy", "item", "_local_scalar", "EventSynchron"))}
    return {
        "steps": steps,
        "wall_ms_per_step_under_profiler": round(wall * 1e3 / steps, 3),
        "gpu_window_ms_per_step": round(window / 1e3 / steps, 3),
        "gpu_busy_ms_per_step": round(busy / 1e3 / steps, 3),
        "gpu_idle_ms_per_step": round((window - busy) / 1e3 / steps, 3),
        "kernels_per_step": round(len(kernels) / steps, 1),
        "graph_launches": host_count.get("cudaGraphLaunch", 0),
        "largest_gaps_us": [(round(g, 1), a, b) for g, _, a, b in sorted(gaps, reverse=True)[:15]],
        # every gap over 0.5 ms in time order: (its start in ms from the first kernel, its length in ms, around it)
        "gaps_over_half_ms_in_order": [(round(at / 1e3, 3), round(g / 1e3, 3), a, b) for g, at, a, b in gaps
                                       if g > 500],
        "host_waits": waits,
        "top_host_ops_ms": [(name, round(ms / 1e3, 3)) for name, ms in host_time.most_common(20)],
    }


def per_step(pipe, embeds, steps: int, runs: int) -> dict:
    shape = dict(VIDEO, steps=steps)
    full = [cuda_ms(lambda: sample(pipe, output_type="latent", prompt_embeds=embeds, **shape)) for _ in range(runs)]
    half = dict(shape, steps=steps // 2)
    short = min(cuda_ms(lambda: sample(pipe, output_type="latent", prompt_embeds=embeds, **half))
                for _ in range(runs))
    slope = (min(full) - short) / (steps - steps // 2)
    return {"pipeline_ms_per_step": [round(v / steps, 3) for v in full], "slope_ms_per_step": round(slope, 3),
            "intercept_ms_per_video": round(min(full) - slope * steps, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=6)
    parser.add_argument("--parts", nargs="+", choices=["hand", "trees"], default=["trees", "hand"],
                        help="in this order (the product's CUDA graph trees first by default)")
    parser.add_argument("--trace-dir", default=None, help="also write each part's profile as a chrome trace here")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def trace(part: str) -> str | None:
        return str(Path(args.trace_dir) / f"{part}_pipeline_trace.json.gz") if args.trace_dir else None

    def save(part: str, values: dict) -> None:
        report[part] = values
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(json.dumps({part: values}, indent=1), flush=True)

    pipe = build_pipeline(None)
    add_subject_lora(pipe)
    optimize_pipeline(pipe, SpeedConfig(compile="full", compile_mode="default"))
    embeds = pipe.encode_prompt([PROMPT]).clone()
    with torch.no_grad():
        for part in args.parts:  # in the order given: each recompiles the UNet in its own mode
            began = time.perf_counter()
            torch._dynamo.reset()
            pipe.unet._compiled_call_impl = None
            compile_unet(pipe.unet, "full", "default" if part == "hand" else "reduce-overhead")
            values = (hand_part if part == "hand" else trees_part)(pipe, embeds, args)
            save(part, {"warmup_s": round(time.perf_counter() - began, 1), **values})
            report[part]["profile"] = profile_pipeline(pipe, embeds, args.profile_steps, trace(part))
            save(part, report[part])
    report["total_s"] = round(time.perf_counter() - started, 1)
    save("total_s", report["total_s"])


def hand_part(pipe, embeds, args) -> dict:
    shape = dict(VIDEO, steps=args.steps)
    sample(pipe, output_type="latent", prompt_embeds=embeds, **shape)  # compiles the UNet (and the text encoder)
    graphs = HandGraphs(pipe.unet)
    pipe.unet._compiled_call_impl = graphs
    sample(pipe, output_type="latent", prompt_embeds=embeds, **shape)  # captures
    graph = next(iter(graphs.graphs.values()))[0]
    replay = [cuda_ms(lambda: [graph.replay() for _ in range(20)]) / 20 for _ in range(args.runs)]
    return {"graphs": len(graphs.graphs), "replay_ms": [round(v, 3) for v in replay],
            **per_step(pipe, embeds, args.steps, args.runs)}


def trees_part(pipe, embeds, args) -> dict:
    shape = dict(VIDEO, steps=args.steps)
    unet = pipe.unet
    for _ in range(3):
        sample(pipe, output_type="latent", prompt_embeds=embeds, **shape)
    values = per_step(pipe, embeds, args.steps, args.runs)
    context = torch.cat([pipe.encode_prompt([""]), embeds]).to(unet.dtype)
    x = torch.randn(1, 4, 16, 40, 64, device="cuda", dtype=unet.dtype)
    t = torch.full((1,), 500, device="cuda", dtype=torch.long)
    fps = torch.full((1,), 16, device="cuda", dtype=torch.long)

    def unet_only():
        for _ in range(args.steps):
            unet(x, t, context, fps=fps, return_dict=False)[0].float()

    with dwvss_sampling(unet, DWVSSConfig(), args.steps) as callback:  # the LoRA fused, as sampling runs it
        callback.fuser.set_scale(DWVSSConfig().lambda_l)
        unet_only()
        values["unet_only_ms_per_step"] = [round(cuda_ms(unet_only) / args.steps, 3) for _ in range(args.runs)]
    values.update(tree_state())
    return values


def tree_state() -> dict:
    """How many graphs the trees recorded, and inductor's counters (a skipped or re-recorded graph, e.g. for a
    mutated input, runs its kernels one launch at a time)."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    recorded = next(manager.graph_counter) if manager is not None else None  # ids issued so far (one consumed)
    return {"graphs_recorded": recorded, "counters": inductor_counters()}


if __name__ == "__main__":
    main()
