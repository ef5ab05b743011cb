#!/usr/bin/env python
"""Probe: where the sampling loop's time goes beyond the UNet's kernels, with the product's compiled UNet
(compile="full", CUDA graphs through torch.compile's "reduce-overhead" mode) and DWVSS's fused LoRA.

Times, in one process after the warm-up videos: the whole loop per step (the pipeline, at the full and at half the
number of steps, so that what is paid once per video shows apart), the UNet call alone per step
(same inputs, no scheduler), the UNet call + the pipeline's per-step arithmetic; then profiles a few UNet calls:
kernel time against wall time, CUDA graph launches per call (a compiled graph split into partitions launches
several), and host calls that wait for the GPU (synchronisations, device-to-host copies).

    python benchmarks/probe_loop_overhead.py --out loop_overhead.json
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
from gpu import PROMPT, add_subject_lora, build_pipeline, cuda_ms, sample  # noqa: E402

from customcrafter.dwvss import DWVSSConfig, dwvss_sampling  # noqa: E402
from customcrafter.performance import SpeedConfig, optimize_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--profile-calls", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    pipe = build_pipeline(None)
    add_subject_lora(pipe)
    optimize_pipeline(pipe, SpeedConfig(compile="full"))
    shape = dict(steps=args.steps, frames=16, height=320, width=512)
    for _ in range(2):
        sample(pipe, output_type="latent", **shape)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "warmup_s": round(time.perf_counter() - started, 1)}
    embeds = pipe.encode_prompt([PROMPT]).clone()
    loop = [cuda_ms(lambda: sample(pipe, output_type="latent", prompt_embeds=embeds, **shape)) / args.steps
            for _ in range(3)]
    report["pipeline_ms_per_step"] = [round(v, 3) for v in loop]
    # per video and per step apart: the same call at half the steps (a cost paid once per video, e.g. switching
    # between the text encoder's, the UNet's and the VAE's CUDA graphs, shows as the intercept)
    half = dict(shape, steps=args.steps // 2)
    short = min(cuda_ms(lambda: sample(pipe, output_type="latent", prompt_embeds=embeds, **half)) for _ in range(3))
    full = min(loop) * args.steps
    slope = (full - short) / (args.steps - args.steps // 2)
    report["pipeline_per_step_ms_slope"] = round(slope, 3)
    report["pipeline_per_video_ms_intercept"] = round(full - slope * args.steps, 3)
    print(json.dumps(report), flush=True)

    unet, scheduler = pipe.unet, pipe.scheduler
    negative = pipe.encode_prompt([""]).clone()
    context = torch.cat([negative, embeds]).to(unet.dtype)
    scheduler.set_timesteps(args.steps)
    timesteps = scheduler.timesteps.tolist()
    latents = torch.randn(1, 4, 16, 40, 64, device="cuda")
    fps = torch.full((1,), 16, device="cuda", dtype=torch.long)
    noise = torch.randn(args.steps, 1, 4, 16, 40, 64, device="cuda")

    def unet_call(x, t):
        return unet(x.to(unet.dtype), torch.full((1,), t, device="cuda", dtype=torch.long), context, fps=fps,
                    return_dict=False)[0].float()

    def unet_only():
        for t in timesteps:
            unet_call(latents, t)

    def unet_and_step():
        x = latents
        for i, t in enumerate(timesteps):
            eps = unet_call(x, t)
            uncond, cond = eps.chunk(2)
            x = scheduler.step(uncond + 12.0 * (cond - uncond), t, x, eta=1.0, variance_noise=noise[i],
                               return_dict=False)[0]

    with dwvss_sampling(unet, DWVSSConfig(), args.steps) as callback:
        callback.fuser.set_scale(DWVSSConfig().lambda_l)
        unet_and_step()  # the input layout of these calls once before timing
        report["unet_only_ms_per_step"] = [round(cuda_ms(unet_only) / args.steps, 3) for _ in range(3)]
        report["unet_and_step_ms_per_step"] = [round(cuda_ms(unet_and_step) / args.steps, 3) for _ in range(3)]
        print(json.dumps(report), flush=True)

        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            wall = time.perf_counter()
            for t in timesteps[:args.profile_calls]:
                unet_call(latents, t)
            torch.cuda.synchronize()
            wall = time.perf_counter() - wall
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    host = Counter(e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU)
    waits = {name: count for name, count in host.items()
             if any(key in name for key in ("Synchronize", "synchronize", "Memcpy", "memcpy", "item", "_local_scalar"))}
    report["profile"] = {
        "calls": args.profile_calls,
        "wall_ms_per_call_under_profiler": round(wall * 1e3 / args.profile_calls, 3),
        "kernel_ms_per_call": round(sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / args.profile_calls, 3),
        "kernels_per_call": len(kernels) / args.profile_calls,
        "graph_launches_per_call": host.get("cudaGraphLaunch", 0) / args.profile_calls,
        "host_waits_and_copies": waits,
        "top_host_ops": host.most_common(25),
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
