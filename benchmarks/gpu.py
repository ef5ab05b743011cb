#!/usr/bin/env python
"""GPU benchmark: sampling (DWVSS, 50 DDIM steps, CFG 12, 16×320×512) and CustomCrafter training steps.

Full-size VideoCrafter2 architecture; real weights with ``--weights`` (a converted folder, a checkpoint or a hub id),
random weights otherwise (same work, and every weight that diffusers initialises to zero gets small random values
so no path is inert). Times are medians of several runs after a warm-up, with the GPU synchronised; peak memory is
``torch.cuda.max_memory_allocated`` over the timed region. FLOPs are counted with ``torch.utils.flop_counter`` on one
UNet forward. Writes a JSON (``--out``) and prints a table.

    python benchmarks/gpu.py                          # issue 8's targets with the product's defaults (~20 min)
    python benchmarks/gpu.py --sections sampling      # sampling only: eager and compiled defaults
    python benchmarks/gpu.py --sections sampling --variants all   # every variant measured since session 1 (hours)
    python benchmarks/gpu.py --sections training --train-variants 4:ckpt 16:nockpt

By default it times what the product runs (``DEFAULT_SAMPLING_VARIANTS``, ``DEFAULT_TRAIN_VARIANTS``): one-off
sampling (``SpeedConfig()``, eager), the pipeline's compiled sampling (``SpeedConfig(compile="full")``), training as
``customcrafter train`` runs it on a GPU (4 frames, checkpointing, CUDA graphs) and the compiled training behind the
≥ 3× figures (4 frames with checkpointing as the reference trains, and 16 frames). Each compiled row spends 3-6
minutes compiling from an empty inductor cache; the other variants are the history that RESULTS.md tells.

Two compiled variants on one machine in the time of one compilation: two runs side by side, taking turns to time
(A compiles and warms up alongside B, times while B waits, then B times):

    python benchmarks/gpu.py --sections sampling --variants A --ready-file /tmp/a --wait-for /tmp/b \
        --done-file /tmp/a.done --out a.json &
    sleep 20; python benchmarks/gpu.py --sections sampling --variants B --ready-file /tmp/b \
        --wait-for /tmp/b /tmp/a.done --out b.json

(B's matmul peak is measured while A compiles: take A's.)

Nothing here is asserted: the figures go into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from customcrafter.dwvss import DWVSSConfig, dwvss_sampling
from customcrafter.performance import SpeedConfig, optimize_pipeline

H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA's dense bf16 tensor-core figure for the H100 SXM
PROMPT = "a <new1> dog is swimming in the pool, high quality"
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "reference_h100.json"


# ---------------------------------------------------------------------------------------------------- building
def build_pipeline(weights: str | None, seed: int = 0):
    """Full-size pipeline in float32 on the GPU: loaded weights, or seeded random ones (same seed = same model)."""
    from customcrafter.loading import load_base_pipeline

    if weights:
        return load_base_pipeline(weights, device="cuda")
    from diffusers import AutoencoderKL

    from customcrafter.convert import read_configs
    from customcrafter.models.text import build_text_encoder, load_tokenizer, openclip_text_config
    from customcrafter.models.unet import VideoCrafter2UNet
    from customcrafter.pipeline import VideoCrafter2Pipeline
    from customcrafter.scheduler import VideoCrafter2DDIMScheduler

    configs = read_configs()
    torch.manual_seed(seed)
    with torch.device("cuda"):
        unet = VideoCrafter2UNet(**configs.unet)
        vae = AutoencoderKL(**configs.vae)
        text_encoder = build_text_encoder(openclip_text_config(**configs.text))
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for param in module.parameters():
                if param.ndim >= 2 and not param.any():
                    param.normal_(0, 0.5 / param[0].numel() ** 0.5)
    pipe = VideoCrafter2Pipeline(vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(), unet=unet,
                                 scheduler=VideoCrafter2DDIMScheduler(**configs.scheduler))
    for component in (unet, vae, text_encoder):
        component.requires_grad_(False).eval()
    pipe.base_model_id = "random-full-size"
    return pipe


def add_subject_lora(pipe, seed: int = 1) -> None:
    """A CustomCrafter SSLM adapter (rank 4 on spatial q/k/v, 96 layers) with random up-projections."""
    from customcrafter.training.config import TrainConfig
    from customcrafter.training.methods import CustomCrafterMethod

    method = CustomCrafterMethod(TrainConfig(subject_dir="unused", base_model="random"))
    torch.manual_seed(seed)
    pipe.unet.add_adapter(method.lora_config(), adapter_name="subject")
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
            if "lora_" in name:
                param.requires_grad_(False)


def sync() -> None:
    torch.cuda.synchronize()


def cuda_ms(fn) -> float:
    """Milliseconds of GPU time from before to after ``fn``'s work, measured with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def timed(fn, runs: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def free(*objects) -> None:
    del objects
    gc.collect()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- sampling
def sample(pipe, steps: int, frames: int, height: int, width: int, seed: int = 0, output_type: str = "np",
           prompt_embeds=None, dwvss: DWVSSConfig | None = None):
    """One video as the product samples it (sampling.sample_video): DWVSS on the LoRA, CFG 12, η 1, CPU-seeded."""
    generator = torch.Generator().manual_seed(seed)
    with dwvss_sampling(pipe.unet, dwvss or DWVSSConfig(), steps) as callback:
        kwargs = {"prompt_embeds": prompt_embeds} if prompt_embeds is not None else {"prompt": PROMPT}
        return pipe(num_inference_steps=steps, guidance_scale=12.0, eta=1.0, fps=16, num_frames=frames,
                    height=height, width=width, generator=generator, output_type=output_type,
                    on_step_begin=callback, progress=False, **kwargs).frames


def unet_flops(pipe, frames: int, height: int, width: int, latents: int = 2) -> int:
    """FLOPs of one UNet forward with the CFG pair of contexts: ``latents=2`` counts the whole batch of 2 (the
    reference's work per step, what MFU is quoted against), ``latents=1`` what the pipeline executes (the latents
    once: the part before the first cross-attention runs once)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    x = torch.randn(latents, 4, frames, height // 8, width // 8, device="cuda", dtype=unet.dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=unet.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(x, torch.full((latents,), 500, device="cuda"), context, fps=16)
    return int(counter.get_total_flops())


def matmul_peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    seconds, _ = timed(lambda: [a @ b for _ in range(20)], runs=5, warmup=2)
    return 20 * 2 * 8192**3 / seconds / 1e12


def add_turn_arguments(parser: argparse.ArgumentParser) -> None:
    """The options with which runs side by side on one GPU take turns to time (``wait_turn``)."""
    parser.add_argument("--ready-file", default=None, help="touched when a run is warm, before timing")
    parser.add_argument("--wait-for", nargs="*", default=[], help="files that must exist before timing (another "
                                                                    "run's --ready-file/--done-file)")
    parser.add_argument("--done-file", default=None, help="touched when this run ends (also on errors)")
    parser.add_argument("--wait-timeout", type=float, default=900.0)


def wait_turn(args, proceed_after_timeout: bool = False) -> None:
    """Two runs of this script side by side on one GPU (``--ready-file``/``--wait-for``/``--done-file``): each
    compiles and warms up while the other does, and the timed parts take turns. So two compiled variants are
    compared on one machine in the time of one compilation. After ``--wait-timeout`` seconds: raise, or with
    ``proceed_after_timeout`` time anyway (a run that never got ready then only delays the others)."""
    if args.ready_file:
        Path(args.ready_file).touch()
    deadline = time.monotonic() + args.wait_timeout
    for path in args.wait_for:
        while not Path(path).exists():
            if time.monotonic() > deadline:
                if proceed_after_timeout:
                    return
                raise TimeoutError(f"--wait-for {path}: not there after {args.wait_timeout} s")
            time.sleep(0.2)


def bench_sampling_variant(name: str, speed: SpeedConfig, args, flops_per_step: int, peak_tflops: float) -> dict:
    pipe = build_pipeline(args.weights)
    add_subject_lora(pipe)
    optimize_pipeline(pipe, speed)
    shape = dict(steps=args.steps, frames=args.frames, height=args.height, width=args.width)

    started = time.perf_counter()
    sample(pipe, **shape)  # warm-up: compilation, cuDNN autotuning
    sync()
    warmup_s = time.perf_counter() - started
    # The first few videos after a compilation ran 0.4-0.7 s slower (two machines, session 6); discard them too.
    for _ in range(args.extra_warmup_videos):
        sample(pipe, **shape)
    sync()

    wait_turn(args)
    torch.cuda.reset_peak_memory_stats()
    weights_gib = torch.cuda.memory_allocated() / 2**30
    end_to_end, runs = timed(lambda: sample(pipe, **shape), runs=args.runs, warmup=0)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    frames = sample(pipe, **shape)

    # breakdown: text encoding, denoising loop (to latents), VAE decode to uint8 on the host
    text_s, _ = timed(lambda: pipe.encode_prompt(["", PROMPT]), runs=args.runs)  # one pass, as the pipeline
    embeds = pipe.encode_prompt(PROMPT)
    loop_s, _ = timed(lambda: sample(pipe, output_type="latent", prompt_embeds=embeds, **shape), runs=args.runs)
    latents = sample(pipe, output_type="latent", prompt_embeds=embeds, **shape)

    def decode():
        from customcrafter.models.vae import decode_video

        with torch.no_grad():
            video = decode_video(pipe.vae, latents, chunk_size=pipe.decode_chunk_size)
            return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()

    decode_s, _ = timed(decode, runs=args.runs)
    unet_flops_video = flops_per_step * args.steps
    result = {
        "variant": name, "speed_config": speed.model_dump(), "warmup_s": round(warmup_s, 2),
        "end_to_end_s": round(end_to_end, 3), "end_to_end_runs_s": [round(t, 3) for t in runs],
        "text_encode_s": round(text_s, 4), "denoise_loop_s": round(loop_s, 3), "vae_decode_s": round(decode_s, 3),
        "unet_tflops_per_s": round(unet_flops_video / loop_s / 1e12, 1),
        "mfu_vs_measured_peak": round(unet_flops_video / loop_s / 1e12 / peak_tflops, 3),
        "mfu_vs_h100_spec_peak": round(unet_flops_video / loop_s / 1e12 / H100_BF16_DENSE_TFLOPS, 3),
        "peak_memory_gib": round(peak_gib, 2), "weights_gib": round(weights_gib, 2),
        "frames_finite": bool(np.isfinite(frames.astype(np.float32)).all()),
        "frames_shape": list(frames.shape), "frames_dtype": str(frames.dtype),
        "inductor_counters": inductor_counters(),
    }
    print(json.dumps(result), flush=True)
    free(pipe)
    return result


def inductor_counters() -> dict:
    """torch.compile's counters so far in this process (e.g. ``cudagraph_skips``: a compiled graph that runs without
    CUDA graphs, one kernel launch at a time; ``unique_graphs``: graphs compiled, recompilations included)."""
    from torch._dynamo.utils import counters

    return {group: dict(counters[group]) for group in ("inductor", "stats") if group in counters}


def correctness(args, fast: SpeedConfig) -> dict:
    """The fast path against the float32 path on the same weights: one UNet forward and a whole DWVSS video."""
    shape = dict(steps=args.steps, frames=args.frames, height=args.height, width=args.width)
    ref = build_pipeline(args.weights)
    add_subject_lora(ref)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x = torch.randn(2, 4, args.frames, args.height // 8, args.width // 8, device="cuda")
    context = torch.randn(2, 77, ref.unet.config.cross_attention_dim, device="cuda")
    with torch.no_grad():
        eps_ref = ref.unet(x, torch.tensor([700, 700], device="cuda"), context, fps=16).sample.double()
    latents_ref = sample(ref, output_type="latent", **shape).double()
    frames_ref = sample(ref, **shape).astype(np.int16)
    free(ref)

    pipe = build_pipeline(args.weights)
    add_subject_lora(pipe)
    optimize_pipeline(pipe, fast)
    with torch.no_grad():
        eps = pipe.unet(x.to(pipe.unet.dtype), torch.tensor([700, 700], device="cuda"), context.to(pipe.unet.dtype),
                        fps=16).sample.double()
    latents = sample(pipe, output_type="latent", **shape).double()
    frames = sample(pipe, **shape).astype(np.int16)
    free(pipe)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    result = {
        "unet_forward_rel_err": rel(eps, eps_ref),
        "video_latents_rel_err": rel(latents, latents_ref),
        "video_uint8_mean_abs_diff": float(np.abs(frames - frames_ref).mean()),
        "note": "fp32 reference with TF32 off vs the fast path, same random weights, same noise; 50 stochastic "
                "DDIM steps at CFG 12 amplify per-step bf16 differences",
    }
    print(json.dumps(result), flush=True)
    return result


# ---------------------------------------------------------------------------------------------------- training
def synthetic_subject(root: Path, count: int, size: tuple[int, int]) -> Path:
    from PIL import Image

    folder = root / "subject"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def benchmark_train_config(pipe, root: Path, frames: int, **overrides):
    """A bf16 CustomCrafter training config on synthetic subject and class images under ``root`` (every training
    benchmark trains on the same kind of data)."""
    from customcrafter.training.config import TrainConfig

    subject = synthetic_subject(root, 4, (512, 512))
    class_dir = synthetic_subject(root / "class", 4, (320, 512))
    if overrides.pop("examples", False):  # as the pipeline trains: from materialised augmented examples
        from customcrafter.data.augment import AugmentConfig, materialise_examples

        (subject / "subject.yaml").write_text("name: subject\nclass_word: dog\n")
        resolution = overrides.get("resolution", (320, 512))
        overrides["examples_dir"] = str(materialise_examples(subject, root / "examples", num_examples=16,
                                                             config=AugmentConfig(resolution=resolution)))
    settings = dict(output_dir=str(root / "run"), checkpoint_every=None, mixed_precision="bf16") | overrides
    return TrainConfig(base_model=pipe.base_model_id, subject_dir=str(subject), class_word="dog", num_frames=frames,
                       class_images_dir=str(class_dir), num_class_images=4, **settings)


# --train-variants options after FRAMES:ckpt|nockpt: each sets one field of the benchmark's TrainConfig (`examples`:
# benchmark_train_config's own switch)
TRAIN_VARIANT_OPTIONS = {
    "regional": ("compile", "regional"), "full": ("compile", "full"),
    "rewrites": ("compile_rewrites", True), "norewrites": ("compile_rewrites", False),
    "bf16": ("frozen_dtype", "bf16"), "graphs": ("cuda_graphs", True), "sdpa": ("temporal_attention", "sdpa"),
    "triton": ("temporal_attention", "triton"), "efficient": ("temporal_attention", "efficient"),
    "nocache": ("cache_image_moments", False), "examples": ("examples", True),
    "cudnnbench": ("cudnn_benchmark", True),
}


def parse_train_variant(variant: str) -> tuple[int, bool, dict]:
    """``FRAMES:ckpt|nockpt[:option...]`` -> (frames, gradient checkpointing, TrainConfig overrides)."""
    parts = variant.split(":")
    if len(parts) < 2 or not parts[0].isdigit() or int(parts[0]) < 1 or parts[1] not in ("ckpt", "nockpt"):
        raise SystemExit(f"--train-variants {variant}: expected FRAMES:ckpt|nockpt[:option...], e.g. 16:nockpt:full")
    extra = {"cuda_graphs": False}
    for option in parts[2:]:
        if option not in TRAIN_VARIANT_OPTIONS:
            raise SystemExit(f"--train-variants {variant}: unknown option {option!r} "
                             f"(one of {', '.join(TRAIN_VARIANT_OPTIONS)})")
        field, value = TRAIN_VARIANT_OPTIONS[option]
        extra[field] = value
    return int(parts[0]), parts[1] == "ckpt", extra


def bench_training(args, frames: int, checkpointing: bool, extra: dict) -> dict:
    from customcrafter.training.trainer import train

    pipe = build_pipeline(args.weights)
    steps = args.train_steps
    config = benchmark_train_config(pipe, Path(tempfile.mkdtemp()), frames, steps=steps,
                                    log_every=max(1, steps // 4), gradient_checkpointing=checkpointing, **extra)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(config, pipe=pipe)
    total = time.perf_counter() - started
    per_step = result.step_seconds
    # the first interval holds warm-up (and the CUDA-graph capture)
    step_s = statistics.median(per_step[1:] or per_step) if per_step else total / steps
    out = {"frames": frames, "gradient_checkpointing": checkpointing, **extra, "steps": steps,
           "step_s": round(step_s, 4), "steps_per_s": round(1 / step_s, 2),
           "intervals_s": [round(s, 4) for s in per_step], "total_s": round(total, 1),
           "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "hours_for_10000_steps": round(10_000 * step_s / 3600, 2),
           "loss_finite": bool(np.isfinite(result.losses).all()),
           # same seed and data in every variant: the per-step losses compare variants' numerics
           "losses": [round(x, 5) for x in result.losses]}
    print(json.dumps(out), flush=True)
    free(pipe)
    return out


def graphs_check(args, frames: int, steps: int = 6) -> dict:
    """Train the same steps eagerly and with CUDA graphs (same model, seed, data): losses and trained tensors agree
    up to bf16 kernel non-determinism?"""
    from safetensors.torch import load_file

    from customcrafter.training.trainer import train

    tmp = Path(tempfile.mkdtemp())
    runs = {}
    for name, graphs in (("eager", False), ("eager_again", False), ("graphs", True)):
        pipe = build_pipeline(args.weights)
        config = benchmark_train_config(pipe, tmp / name, frames, steps=steps, log_every=1,
                                        gradient_checkpointing=False, cuda_graphs=graphs, lr=1e-3)
        result = train(config, pipe=pipe)
        weights = load_file(str(result.module_dir / "adapter_model.safetensors"))
        token = load_file(str(result.module_dir / "token_embeddings.safetensors"))
        runs[name] = (result.losses, weights, token)
        free(pipe)

    def compare(a: str, b: str) -> dict:
        (losses_a, w_a, t_a), (losses_b, w_b, t_b) = runs[a], runs[b]
        lora_b = [k for k in w_a if "lora_B" in k]
        num = sum(float((w_a[k] - w_b[k]).norm() ** 2) for k in lora_b) ** 0.5
        den = sum(float(w_a[k].norm() ** 2) for k in lora_b) ** 0.5
        return {"max_abs_loss_diff": max(abs(x - y) for x, y in zip(losses_a, losses_b, strict=True)),
                "lora_B_rel_diff": num / max(den, 1e-30),
                "token_rel_diff": max(float((t_a[k] - t_b[k]).norm() / t_a[k].norm()) for k in t_a)}

    out = {"frames": frames, "steps": steps, "lr": 1e-3,
           "losses": {name: [round(x, 5) for x in run[0]] for name, run in runs.items()},
           "eager_vs_eager_again": compare("eager", "eager_again"), "eager_vs_graphs": compare("eager", "graphs")}
    print(json.dumps(out), flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- profile
def cfg_forward_inputs(unet, frames: int, height: int, width: int):
    """Random ``(latents, timestep, contexts)`` for one UNet forward as the pipeline calls it with CFG: the latents
    once, the (negative, positive) contexts."""
    x = torch.randn(1, 4, frames, height // 8, width // 8, device="cuda", dtype=unet.dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=unet.dtype)
    return x, torch.tensor([500], device="cuda"), context


def profile(args, speed: SpeedConfig, out_dir: Path, name: str = "unet") -> None:
    """Where one CFG UNet forward spends GPU time: the top operators and kernels (and a Chrome trace)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    pipe = build_pipeline(args.weights)
    optimize_pipeline(pipe, speed)
    unet = pipe.unet
    x, t, context = cfg_forward_inputs(unet, args.frames, args.height, args.width)
    with torch.no_grad():
        for _ in range(3):
            unet(x, t, context, fps=16)
        sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            unet(x, t, context, fps=16)
        end.record()
        sync()
        wall_ms = start.elapsed_time(end) / 10  # back to back, as in the denoising loop: kernels + the gaps between
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                unet(x, t, context, fps=16)
            sync()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    trace = out_dir / f"{name}_trace.json"
    prof.export_chrome_trace(str(trace))
    events = kernel_events(trace)
    summary = {"wall_ms_per_forward": round(wall_ms, 3)} | kernel_summary(events, forwards=3)
    (out_dir / f"{name}_kernels.json").write_text(json.dumps(summary, indent=2))
    (out_dir / f"{name}_calls.json").write_text(json.dumps(kernel_calls(events)))
    print(json.dumps({k: v for k, v in summary.items() if k != "top_kernels"}, indent=1))
    for row in summary["top_kernels"][:40]:
        print(f"{row['ms_per_forward']:8.3f} ms {row['calls_per_forward']:6.1f}x  {row['category']:10s} "
              f"{row['name'][:110]}")
    free(pipe)


def kernel_events(trace: Path) -> list[dict]:
    """The kernel launches of a Chrome trace, in start order."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "kernel" and "dur" in e]
    return sorted(events, key=lambda e: e["ts"])


def kernel_calls(events: list[dict]) -> list[dict]:
    """Every kernel launch (``kernel_events``): name, start and duration (µs), grid and block, to map kernels onto
    layers and compare each with its own bandwidth or FLOP floor."""
    return [{"name": e["name"], "ts": e["ts"], "dur": e["dur"], "grid": e.get("args", {}).get("grid"),
             "block": e.get("args", {}).get("block")} for e in events]


KERNEL_CATEGORIES = (  # first match wins; lower-case substrings of CUDA kernel names
    ("attention", ("flash", "fmha", "attn", "sdpa", "attention")),
    ("conv", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "nhwc", "nchw")),
    ("gemm", ("gemm", "nvjet", "cutlass", "cublas", "sm90_xmma", "matmul", "_mm_")),
    ("norm", ("group_norm", "native_layer_norm", "layer_norm", "red_fused", "per_fused")),
    ("pointwise", ("poi_fused", "elementwise", "vectorized", "copy", "cat", "clone")),
)


def kernel_summary(events: list[dict], forwards: int) -> dict:
    """GPU time per kernel category (and the top kernels) of the kernel launches (``kernel_events``), per UNet
    forward."""
    by_name: dict[str, list[float]] = {}
    for event in events:
        by_name.setdefault(event["name"], []).append(event["dur"] / 1000.0)

    def category(name: str) -> str:
        low = name.lower()
        # inductor names its kernels after every op they fuse ("..._convolution_native_group_norm_silu"): what
        # it generates is norm or pointwise work, whatever ops it names
        categories = KERNEL_CATEGORIES[3:] if low.startswith(("triton_per", "triton_red", "triton_poi")) \
            else KERNEL_CATEGORIES
        for label, needles in categories:
            if any(n in low for n in needles):
                return label
        return "other"

    rows = sorted(({"name": n, "category": category(n), "ms_per_forward": sum(d) / forwards,
                    "calls_per_forward": len(d) / forwards} for n, d in by_name.items()),
                  key=lambda r: -r["ms_per_forward"])
    total = sum(r["ms_per_forward"] for r in rows)
    by_cat: dict[str, float] = {}
    for row in rows:
        by_cat[row["category"]] = by_cat.get(row["category"], 0.0) + row["ms_per_forward"]
    return {"gpu_ms_per_forward": round(total, 3),
            "kernels_per_forward": round(sum(r["calls_per_forward"] for r in rows), 1),
            "ms_by_category": {k: round(v, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{**r, "ms_per_forward": round(r["ms_per_forward"], 4)} for r in rows[:80]]}


# ---------------------------------------------------------------------------------------------------- main
def _session6(**kwargs) -> SpeedConfig:
    """Session 6's settings: its two layer rewrites (GroupNorm, upsampling), biased linears still fused, no CUDA
    graphs unless asked."""
    return SpeedConfig(**{"unfused_linear_bias": False, "compile_mode": "default", "fused_geglu": False} | kwargs)


def _before_rewrites(**kwargs) -> SpeedConfig:
    """Session 5's settings: none of the layer rewrites of ``customcrafter.fusions``."""
    return _session6(**{"channel_stats_group_norm": False, "subpixel_upsample": False} | kwargs)


def _sdpa(**kwargs) -> SpeedConfig:
    """A variant measured before the temporal layers' attention was pinned to the efficient kernel (and before the
    VAE decoder was compiled along with the UNet)."""
    return _before_rewrites(temporal_attention="sdpa", compile_vae=False, compile_text=False, **kwargs)


def _efficient(**kwargs) -> SpeedConfig:
    """Session 4's settings: temporal attention on SDPA's memory-efficient kernel, text encoder eager."""
    return _before_rewrites(temporal_attention="efficient", compile_text=False, **kwargs)


SAMPLING_VARIANTS = {
    "bf16-eager": _sdpa(compile="none", channels_last=False),
    "bf16-eager-channels-last": _sdpa(compile="none", channels_last=True),
    "bf16-regional-compile": _sdpa(compile="regional"),
    "bf16-regional-compile-no-channels-last": _sdpa(compile="regional", channels_last=False),
    "bf16-full-compile": _sdpa(compile="full", channels_last=False),
    "bf16-full-compile-cudagraphs": _sdpa(compile="full", compile_mode="reduce-overhead", channels_last=False),
    "bf16-full-compile-channels-last": _sdpa(compile="full", channels_last=True),
    "bf16-full-compile-cudagraphs-channels-last": _sdpa(compile="full", compile_mode="reduce-overhead",
                                                        channels_last=True),
    "bf16-full-compile-channels-last-math-temporal": _before_rewrites(compile="full", channels_last=True,
                                                                      temporal_attention="math"),
    # temporal attention on the memory-efficient kernel (the defaults of session 4)
    "bf16-eager-efficient-temporal": _efficient(compile="none"),
    "bf16-full-compile-channels-last-efficient-temporal": _efficient(compile="full", compile_vae=False),
    "bf16-full-compile-channels-last-efficient-temporal-compiled-vae": _efficient(compile="full"),
    "bf16-full-compile-cudagraphs-channels-last-efficient-temporal": _efficient(
        compile="full", compile_mode="reduce-overhead", compile_vae=False),
    # our Triton temporal-attention kernel (customcrafter.kernels; session 5)
    "bf16-full-compile-triton-temporal": _before_rewrites(compile="full"),
    "bf16-full-compile-triton-temporal-eager-text": _before_rewrites(compile="full", compile_text=False),
    "bf16-eager-triton-temporal": _before_rewrites(compile="none"),
    # the layer rewrites of customcrafter.fusions (session 6), each alone and together (= the defaults)
    "bf16-full-compile-channel-stats-gn": _session6(compile="full", subpixel_upsample=False),
    "bf16-full-compile-subpixel": _session6(compile="full", channel_stats_group_norm=False),
    "bf16-full-compile-rewrites": _session6(compile="full"),
    # + biased linears as a plain matmul and a separate bias add (session 7), then CUDA graphs on top (the defaults)
    "bf16-full-compile-unfused-bias": SpeedConfig(compile="full", compile_mode="default", fused_geglu=False),
    "bf16-full-compile-unfused-bias-cudagraphs": SpeedConfig(compile="full", fused_geglu=False),
    # + the feed-forwards' GEGLU as one Triton GEMM with the gating in its epilogue (session 11; the defaults)
    "bf16-full-compile-fused-geglu-cudagraphs": SpeedConfig(compile="full"),
    # inductor's plain CUDA-graph capture instead of graph trees (session 27)
    "bf16-full-compile-fused-geglu-cudagraphs-no-trees": SpeedConfig(compile="full", cudagraph_trees=False),
    "bf16-eager-rewrites": SpeedConfig(compile="none", channel_stats_group_norm=True, unfused_linear_bias=True),
    # the product's one-off path: `customcrafter sample` without compiling (session 21)
    "bf16-eager-defaults": SpeedConfig(),
}
# what the product runs: one-off videos (eager) and the pipeline's evaluation sampling (compiled, CUDA graphs)
DEFAULT_SAMPLING_VARIANTS = ["bf16-eager-defaults", "bf16-full-compile-fused-geglu-cudagraphs"]
# training as `customcrafter train` runs on one GPU, then the compiled runs behind issue 8's >= 3x (reference setting
# 4 frames with checkpointing; 16 frames without)
DEFAULT_TRAIN_VARIANTS = ["4:ckpt:graphs", "4:ckpt:full:graphs", "16:nockpt:full:graphs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="converted folder, checkpoint or hub id; default random")
    parser.add_argument("--sections", nargs="+", default=["sampling", "correctness", "training"],
                        choices=["sampling", "correctness", "training", "graphs-check", "profile"])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_SAMPLING_VARIANTS,
                        choices=[*SAMPLING_VARIANTS, "all"], help="SpeedConfig variants to time ('all': every one)")
    parser.add_argument("--correctness-variant", default="bf16-eager-rewrites",
                        choices=list(SAMPLING_VARIANTS), help="the fast path that --sections correctness checks")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--extra-warmup-videos", type=int, default=2,
                        help="videos sampled and discarded after the (timed) first one, before the timed runs")
    parser.add_argument("--train-variants", nargs="+", default=DEFAULT_TRAIN_VARIANTS,
                        help="FRAMES:ckpt|nockpt[:regional|full][:rewrites|norewrites][:bf16][:graphs]"
                             "[:triton|:efficient|:sdpa][:nocache][:examples][:cudnnbench] (gradient checkpointing, "
                             "torch.compile, with compile the sampling path's channels-last convs and layer rewrites "
                             "(on by default), frozen weights stored in bf16, CUDA graphs, the temporal attention on "
                             "our Triton kernels (the default), SDPA's memory-efficient kernel or SDPA's own kernel "
                             "choice, class images' VAE posteriors "
                             "encoded every step instead of cached, training from 16 materialised examples as the "
                             "pipeline does instead of augmenting on the fly, cuDNN's algorithm timing on)")
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--out", default="benchmark_gpu.json")
    add_turn_arguments(parser)
    args = parser.parse_args()
    if "all" in args.variants:
        args.variants = list(SAMPLING_VARIANTS)
    for variant in args.train_variants:
        parse_train_variant(variant)  # a typo stops the run here, not after an hour of sampling
    try:
        run(args)
    finally:
        if args.done_file:
            Path(args.done_file).touch()


def run(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU")

    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "python": platform.python_version(),
                    "date": time.strftime("%Y-%m-%d"), "weights": args.weights or "random",
                    "shape": {"frames": args.frames, "height": args.height, "width": args.width,
                              "steps": args.steps, "guidance_scale": 12.0, "dwvss": DWVSSConfig().model_dump()}}
    report["matmul_peak_tflops"] = round(matmul_peak_tflops(), 1)
    print(json.dumps({"matmul_peak_tflops": report["matmul_peak_tflops"]}), flush=True)

    def save():
        Path(args.out).write_text(json.dumps(report, indent=2))

    if "profile" in args.sections:
        for name in args.variants:
            print(f"--- profile {name}", flush=True)
            profile(args, SAMPLING_VARIANTS[name], Path(args.out).parent, name)
    if "sampling" in args.sections:
        probe = build_pipeline(args.weights)
        optimize_pipeline(probe, SpeedConfig(compile="none"))
        flops = unet_flops(probe, args.frames, args.height, args.width)
        report["unet_flops_per_step_cfg_batch"] = flops
        report["unet_flops_per_step_executed"] = unet_flops(probe, args.frames, args.height, args.width, latents=1)
        free(probe)
        report["sampling"] = []
        for name in args.variants:
            try:
                report["sampling"].append(bench_sampling_variant(name, SAMPLING_VARIANTS[name], args, flops,
                                                                 report["matmul_peak_tflops"]))
            except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others' figures
                report["sampling"].append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
                print(json.dumps(report["sampling"][-1]), flush=True)
                free()
            save()
    if "correctness" in args.sections:
        report["correctness"] = {"variant": args.correctness_variant,
                                 **correctness(args, SAMPLING_VARIANTS[args.correctness_variant])}
        save()
    if "training" in args.sections:
        report["training"] = []
        for variant in args.train_variants:
            frames, checkpointing, extra = parse_train_variant(variant)
            try:
                report["training"].append(bench_training(args, frames, checkpointing, extra))
            except Exception as exc:  # noqa: BLE001
                report["training"].append({"frames": frames, "gradient_checkpointing": checkpointing, **extra,
                                           "error": f"{type(exc).__name__}: {exc}"[:500]})
                print(json.dumps(report["training"][-1]), flush=True)
                free()
            save()
    if "graphs-check" in args.sections:
        report["training_graphs_check"] = graphs_check(args, frames=4)
        save()
    if REFERENCE.is_file():
        report["reference_h100"] = json.loads(REFERENCE.read_text())
    save()
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\n{report['device']} | torch {report['torch']} | {report['date']} | weights {report['weights']}")
    for row in report.get("sampling", []):
        if "error" in row:
            print(f"  sampling {row['variant']:<40} ERROR {row['error'][:80]}")
            continue
        print(f"  sampling {row['variant']:<40} e2e {row['end_to_end_s']:6.2f} s | text {row['text_encode_s']:.3f} "
              f"| loop {row['denoise_loop_s']:.2f} | decode {row['vae_decode_s']:.2f} | "
              f"{row['unet_tflops_per_s']} TFLOP/s (MFU {row['mfu_vs_measured_peak']:.0%}) | "
              f"peak {row['peak_memory_gib']} GiB | warm-up {row['warmup_s']} s")
    if "correctness" in report:
        c = report["correctness"]
        print(f"  correctness: UNet rel err {c['unet_forward_rel_err']:.2e}, video latents rel err "
              f"{c['video_latents_rel_err']:.2e}, uint8 mean |diff| {c['video_uint8_mean_abs_diff']:.2f}")
    for row in report.get("training", []):
        if "error" in row:
            print(f"  training {row['frames']} frames ckpt={row['gradient_checkpointing']} {row.get('compile', '')} "
                  f"ERROR {row['error'][:80]}")
            continue
        print(f"  training {row['frames']:>2} frames ckpt={row['gradient_checkpointing']!s:<5} "
              f"compile={row.get('compile', 'none'):<8} frozen={row.get('frozen_dtype', 'fp32')} "
              f"{row['step_s']:.3f} s/step "
              f"({row['steps_per_s']} step/s) | peak {row['peak_memory_gib']} GiB | 10k steps "
              f"{row['hours_for_10000_steps']} h")


if __name__ == "__main__":
    main()
