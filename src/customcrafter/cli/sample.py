"""`customcrafter sample`: one video from the base model, optionally with subject modules (DWVSS for CustomCrafter)."""

from __future__ import annotations

from pathlib import Path

import typer

from customcrafter.cli import UserError, app


@app.command("sample")
def sample_command(
    prompt: str = typer.Option(..., "--prompt", help='e.g. "<new1> dog is running on a beach".'),
    out: Path = typer.Option(..., "--out", help="Output video: .mp4 or .gif (must not exist unless --force)."),
    subject_modules: list[Path] = typer.Option(None, "--subject-module", help="Subject module folder "
                                                                               "(repeatable); none = base model."),
    dwvss: str | None = typer.Option(None, "--dwvss", help="LAMBDA_S,LAMBDA_L,K[,reference] (default 0.4,0.8,5)."),
    no_dwvss: bool = typer.Option(False, "--no-dwvss", help="Plain LoRA sampling at scale 1."),
    base_model: str = typer.Option("VideoCrafter/VideoCrafter2", "--base-model", help="'tiny', hub id, "
                                                                                      "checkpoint or folder."),
    steps: int | None = typer.Option(None, "--steps", help="DDIM steps (default 50)."),
    seed: int = typer.Option(0, "--seed"),
    config: Path | None = typer.Option(None, "--config", help="SampleConfig YAML."),
    overrides: list[str] = typer.Option(None, "--set", help="Config override KEY=VALUE (repeatable)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N."),
    compile_mode: str = typer.Option("none", "--compile", help="GPU: none, regional or full (torch.compile; "
                                                                "minutes of compilation, for many videos)."),
    dtype: str = typer.Option("bf16", "--dtype", help="GPU weights: bf16, fp16 or fp32 (the CPU runs fp32)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
) -> None:
    """Sample one video and write it to --out."""
    import os
    import tempfile

    from customcrafter.config import load_config
    from customcrafter.dwvss import parse_dwvss
    from customcrafter.loading import load_base_pipeline
    from customcrafter.performance import SpeedConfig, optimize_pipeline
    from customcrafter.sampling import SampleConfig, sample_video
    from customcrafter.subject_module import load_subject_module, read_module_meta
    from customcrafter.utils import pick_device
    from customcrafter.video_io import export_gif, export_mp4

    if dwvss and no_dwvss:
        raise UserError("--dwvss and --no-dwvss exclude each other")
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise UserError(f"--out {out}: use a .mp4 or .gif file name")
    if out.exists() and not force:  # checked before minutes of loading and sampling
        raise UserError(f"--out {out}: already exists (use --force to replace it)")
    sample_config = load_config(SampleConfig, config, overrides, num_inference_steps=steps)
    # everything checkable is checked before minutes of loading the base model
    metas = [read_module_meta(module_dir) for module_dir in subject_modules or []]
    if dwvss and not any(meta.get("uses_lora") for meta in metas):
        raise UserError("--dwvss: DWVSS schedules a CustomCrafter (LoRA) module's scale; none of the given "
                        "--subject-module folders has one (baselines and the base model sample at full strength)")
    try:
        speed = SpeedConfig(compile=compile_mode, dtype=dtype)
    except ValueError as exc:
        raise UserError(f"--compile {compile_mode} / --dtype {dtype}: expected --compile none|regional|full and "
                        f"--dtype bf16|fp16|fp32 ({type(exc).__name__})") from None
    try:
        target = pick_device(device)  # None/auto: the GPU when there is one
    except RuntimeError as exc:
        raise UserError(f"--device {device}: {exc} (auto, cpu, cuda or cuda:N)") from None
    if no_dwvss:
        sample_config = sample_config.model_copy(update={"dwvss": None})
    elif dwvss:
        sample_config = sample_config.model_copy(update={"dwvss": parse_dwvss(dwvss)})
    pipe = load_base_pipeline(base_model, device=target)
    for module_dir in subject_modules or []:
        loaded = load_subject_module(pipe, module_dir)
        if loaded.token_mapping.get(loaded.meta["token"]) != loaded.meta["token"]:
            typer.echo(f"{module_dir}: token {loaded.meta['token']} renamed to {loaded.token}", err=True)
    optimize_pipeline(pipe, speed)
    frames = sample_video(pipe, prompt, seed=seed, config=sample_config)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        (export_gif if out.suffix.lower() == ".gif" else export_mp4)(frames, tmp, fps=8)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    typer.echo(f"wrote {out} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]})")
