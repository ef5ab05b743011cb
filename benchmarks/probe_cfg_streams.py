#!/usr/bin/env python
"""Probe: what one compiled CFG UNet forward costs under a CUDA graph, arranged in different ways.

Roles: ``batch`` (one batch-2 forward, as the pipeline runs it), ``shared`` (one latent for the two contexts: the
part before the first cross-attention runs once, ``VideoCrafter2UNet.forward``), ``split`` (two batch-1 forwards,
one after the other and on two CUDA streams forked and joined inside one graph: does one branch's memory-bound
work overlap the other's GEMMs?). ``--inductor KEY=VALUE`` sets a ``torch._inductor.config`` entry; environment
variables (``TORCHINDUCTOR_ENABLE_PDL=1``, ``CUBLAS_WORKSPACE_CONFIG=:0:0``) are whatever the command sets.

Each role compiles the full-size UNet (random weights, the product's layer rewrites, channels-last, compile mode
"default") and captures its forwards in CUDA graphs by hand; replays are timed with CUDA events.

    python benchmarks/probe_cfg_streams.py --role batch --out batch.json      # one batch-2 forward per replay
    python benchmarks/probe_cfg_streams.py --role split --out split.json      # two batch-1 forwards per replay
    python benchmarks/probe_cfg_streams.py --role shared --out shared.json    # one latent, two contexts

Run both side by side (``--ready-file``/``--wait-for``/``--done-file`` as in gpu.py) to compare them on one machine.
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
from gpu import add_subject_lora, add_turn_arguments, build_pipeline, wait_turn  # noqa: E402

from customcrafter.performance import SpeedConfig, optimize_pipeline  # noqa: E402


def inputs(unet, batch: int, frames: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, 4, frames, 40, 64, device="cuda", dtype=unet.dtype, generator=g)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, device="cuda", dtype=unet.dtype, generator=g)
    t = torch.full((batch,), 500, device="cuda", dtype=torch.long)
    fps = torch.full((batch,), 16, device="cuda", dtype=torch.long)
    return x, t, context, fps


def capture(fn, warmup: int = 3):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def replay_ms(graph, replays: int = 20) -> float:
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["batch", "shared", "split"], required=True)
    parser.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config entries (dotted keys, Python literals)")
    parser.add_argument("--speed", nargs="*", default=[], metavar="KEY=VALUE",
                        help="SpeedConfig fields on top of compile='full', compile_mode='default' (Python literals), "
                             "e.g. fused_geglu=False for the previous code path")
    parser.add_argument("--inner-persistent-max", type=int, default=None, metavar="N",
                        help="let inductor use persistent (single-pass) kernels for row reductions of up to N elements "
                             "(its own limit is 1024: the level-2 LayerNorms, 1280 wide, get two-pass looped kernels); "
                             "give each run its own TORCHINDUCTOR_CACHE_DIR, the compile cache does not see this")
    parser.add_argument("--geglu-gelu", choices=["polynomial", "erf"], default="polynomial",
                        help="the GEGLU kernel's GELU: the product's polynomial, or libdevice's erf (the kernel before "
                             "session 26)")
    parser.add_argument("--geglu-max-k", type=int, default=None, metavar="K",
                        help="send feed-forwards with up to K input channels to the GEGLU kernel (default: the "
                             "product's fusions.FUSED_GEGLU_MAX_K)")
    parser.add_argument("--lora", choices=["fused", "active"], default="fused",
                        help="the subject LoRA fused into the weights at DWVSS's late scale, as sampling runs it "
                             "(default; before session 26 the probe ran it 'active': its own matmuls every forward)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save-outputs", default=None, metavar="PATH",
                        help="torch.save the graphs' outputs (same seeds in every run: compare two variants' UNets)")
    add_turn_arguments(parser)
    args = parser.parse_args()
    try:
        run(args)
    finally:  # a run that fails must not keep the others waiting
        for path in (args.ready_file, args.done_file):
            if path:
                Path(path).touch()


def set_inductor(entries: list[str]) -> dict:
    import torch._inductor.config as config

    applied = {}
    for entry in entries:
        key, value = entry.split("=", 1)
        *path, name = key.split(".")
        target = config
        for part in path:
            target = getattr(target, part)
        setattr(target, name, ast.literal_eval(value))
        applied[key] = getattr(target, name)
    return applied


def set_inner_persistent_max(limit: int) -> type:
    """Inductor's documented heuristics hook (``V.set_choices_handler``): row (inner) reductions of up to ``limit``
    elements become persistent kernels, each row read once into registers."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class Choices(InductorChoices):
        widened = 0  # reductions made persistent that inductor's own limit would have looped

        def should_use_persistent_reduction(self, features, cooperative_reduction, *args, **kwargs):
            own = InductorChoices.should_use_persistent_reduction(features, cooperative_reduction, *args, **kwargs)
            if (not own and not cooperative_reduction and features.get_reduction_hint() == ReductionHint.INNER
                    and torch._inductor.config.triton.persistent_reductions
                    and V.graph.sizevars.statically_known_leq(features.reduction_numel, limit)):
                Choices.widened += 1
                return True
            return own

    V.set_choices_handler(Choices())
    return Choices


def use_erf_gelu_in_geglu_kernel() -> None:
    """Before the GEGLU kernel first compiles: its GELU through libdevice's erf, as before session 26 (Triton resolves
    the kernel's helper functions from the kernels module when it compiles)."""
    import triton
    import triton.language as tl

    from customcrafter import kernels

    @triton.jit
    def gelu_polynomial_triton(x):  # the product's name: inductor copies the kernel's helpers into its code by name
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    kernels.gelu_polynomial_triton = gelu_polynomial_triton


def run(args) -> None:
    import os

    started = time.perf_counter()
    inductor = set_inductor(args.inductor)
    choices = set_inner_persistent_max(args.inner_persistent_max) if args.inner_persistent_max else None
    if choices is not None:
        inductor["inner_persistent_max"] = args.inner_persistent_max
    if args.geglu_gelu == "erf":
        use_erf_gelu_in_geglu_kernel()
    if args.geglu_max_k is not None:
        from customcrafter import fusions

        fusions.FUSED_GEGLU_MAX_K = args.geglu_max_k
    pipe = build_pipeline(None)
    add_subject_lora(pipe)
    speed = {key: ast.literal_eval(value) for key, value in (entry.split("=", 1) for entry in args.speed)}
    optimize_pipeline(pipe, SpeedConfig(**{"compile": "full", "compile_mode": "default"} | speed))
    unet = pipe.unet
    if args.lora == "fused":
        from customcrafter.dwvss import DWVSSConfig, LoraPhaseFuser

        LoraPhaseFuser(unet).__enter__().set_scale(DWVSSConfig().lambda_l)  # kept fused until the process ends
    report: dict = {"role": args.role, "speed": speed, "lora": args.lora, "geglu_gelu": args.geglu_gelu, "geglu_max_k": args.geglu_max_k,
                    "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "inductor": inductor, "enable_pdl": getattr(torch._inductor.config.triton, "enable_pdl", None),
                    "env": {k: v for k, v in os.environ.items() if k.startswith(("TORCHINDUCTOR", "CUBLAS"))}}

    def forward(x, t, context, fps):
        return unet(x, t, context, fps=fps, return_dict=False)[0]

    graphs: dict[str, torch.cuda.CUDAGraph] = {}
    outputs: dict[str, object] = {}
    with torch.no_grad():
        if args.role == "batch":
            both = inputs(unet, 2, args.frames, 0)
            graphs["batch2"], outputs["batch2"] = capture(lambda: forward(*both))
        elif args.role == "shared":
            x, t, context, fps = inputs(unet, 2, args.frames, 0)
            one = (x[:1], t[:1], context, fps[:1])
            graphs["shared_latent_batch2"], outputs["shared"] = capture(lambda: forward(*one))
        else:
            a, b = inputs(unet, 1, args.frames, 1), inputs(unet, 1, args.frames, 2)
            graphs["one_batch1"], _ = capture(lambda: forward(*a))
            graphs["two_batch1_sequential"], outputs["seq"] = capture(lambda: (forward(*a), forward(*b)))
            for name, priority in (("two_batch1_streams", 0), ("two_batch1_streams_priority", -1)):
                side = torch.cuda.Stream(priority=priority)

                def forked(side=side):
                    main = torch.cuda.current_stream()
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        out_b = forward(*b)
                    out_a = forward(*a)
                    main.wait_stream(side)
                    return out_a, out_b

                graphs[name], outputs[name] = capture(forked)
            # the same results either way (the graphs read the same inputs)
            for name in ("two_batch1_streams", "two_batch1_streams_priority"):
                graphs[name].replay()
                graphs["two_batch1_sequential"].replay()
                torch.cuda.synchronize()
                seq, par = outputs["seq"], outputs[name]
                report[f"{name}_max_abs_diff_vs_sequential"] = max(
                    float((s.float() - p.float()).abs().max()) for s, p in zip(seq, par, strict=True))
    report["warmup_s"] = round(time.perf_counter() - started, 1)
    if choices is not None:
        report["reductions_made_persistent"] = choices.widened
    print(json.dumps(report), flush=True)

    # a run that never gets ready (a compile that overran) only delays the others
    wait_turn(args, proceed_after_timeout=True)
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(args.rounds):
        for name, graph in graphs.items():
            times[name].append(round(replay_ms(graph), 3))
    report["ms_per_replay"] = times
    report["ms_per_replay_min"] = {name: min(v) for name, v in times.items()}
    report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.save_outputs:
        torch.save({name: [t.float().cpu() for t in (out if isinstance(out, tuple) else (out,))]
                    for name, out in outputs.items()}, args.save_outputs)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
