"""`customcrafter sample`: one video from the base model, optionally with subject modules (DWVSS for CustomCrafter);
`customcrafter sample-eval-set`: the evaluation set of one module or the base model, for `customcrafter evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from customcrafter.cli import UserError, app
from customcrafter.cli.models import resolve_module_origin

# the options both commands share, declared once
BaseModelOption = Annotated[str, typer.Option("--base-model", help="'tiny', hub id, checkpoint or folder.")]
StepsOption = Annotated[int | None, typer.Option("--steps", help="DDIM steps (default 50).")]
ConfigOption = Annotated[Path | None, typer.Option("--config", help="SampleConfig YAML.")]
OverridesOption = Annotated[list[str] | None, typer.Option("--set", help="Config override KEY=VALUE (repeatable).")]
DeviceOption = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="GPU weights: bf16, fp16 or fp32 (the CPU runs fp32).")]
TrackingUriOption = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow registry for a --subject-module models:/ URI (default: $MLFLOW_TRACKING_URI).")]


def _speed_and_device(compile_mode: str, dtype: str, device: str | None):
    """--compile/--dtype and --device checked (before any loading): a UserError naming the flag."""
    from customcrafter.performance import SpeedConfig
    from customcrafter.utils import pick_device

    try:
        speed = SpeedConfig(compile=compile_mode, dtype=dtype)
    except ValueError as exc:
        raise UserError(f"--compile {compile_mode} / --dtype {dtype}: expected --compile none|regional|full and "
                        f"--dtype bf16|fp16|fp32 ({type(exc).__name__})") from None
    try:
        return speed, pick_device(device)  # None/auto: the GPU when there is one
    except RuntimeError as exc:
        raise UserError(f"--device {device}: {exc} (auto, cpu, cuda or cuda:N)") from None


def _with_dwvss(config, text: str):
    """``config`` with the schedule of ``--dwvss TEXT``, validated as SampleConfig validates it (with the number of
    steps): a UserError naming the option."""
    from pydantic import ValidationError

    from customcrafter.dwvss import parse_dwvss

    schedule = parse_dwvss(text)  # its ValueError names --dwvss
    try:
        return type(config).model_validate({**config.model_dump(), "dwvss": schedule.model_dump()})
    except ValidationError as exc:
        problems = "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())
        raise UserError(f"--dwvss {text}: {problems}") from None


@app.command("sample")
def sample_command(
    prompt: str = typer.Option(..., "--prompt", help='e.g. "<new1> dog is running on a beach".'),
    out: Path = typer.Option(..., "--out", help="Output video: .mp4 or .gif (must not exist unless --force)."),
    subject_modules: list[str] = typer.Option(None, "--subject-module", help="Subject module folder, or a "
                                              "registered one: models:/customcrafter-dog@champion, models:/NAME/3 "
                                              "(repeatable); none = base model."),
    dwvss: str | None = typer.Option(None, "--dwvss", help="LAMBDA_S,LAMBDA_L,K[,reference] (default 0.4,0.8,5)."),
    no_dwvss: bool = typer.Option(False, "--no-dwvss", help="Plain LoRA sampling at scale 1."),
    base_model: BaseModelOption = "VideoCrafter/VideoCrafter2",
    steps: StepsOption = None,
    seed: int = typer.Option(0, "--seed"),
    config: ConfigOption = None,
    overrides: OverridesOption = None,
    device: DeviceOption = None,
    compile_mode: str = typer.Option("none", "--compile", help="GPU: none, regional or full (torch.compile; "
                                                                "minutes of compilation, for many videos)."),
    dtype: DtypeOption = "bf16",
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Sample one video and write it to --out."""
    from customcrafter.config import load_config
    from customcrafter.loading import load_base_pipeline
    from customcrafter.performance import optimize_pipeline
    from customcrafter.sampling import SampleConfig, sample_video
    from customcrafter.subject_module import load_subject_module, read_module_meta
    from customcrafter.utils import file_in_the_way
    from customcrafter.video_io import export_gif, export_mp4

    if dwvss and no_dwvss:
        raise UserError("--dwvss and --no-dwvss exclude each other")
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise UserError(f"--out {out}: use a .mp4 or .gif file name")
    if out.exists() and not force:  # checked before minutes of loading and sampling
        raise UserError(f"--out {out}: already exists (use --force to replace it)")
    if (blocker := file_in_the_way(out.parent)) is not None:
        raise UserError(f"--out {out}: {blocker} is a file, not a folder")
    sample_config = load_config(SampleConfig, config, overrides, num_inference_steps=steps)
    # everything checkable is checked before minutes of loading the base model
    module_dirs = [resolve_module_origin(value, tracking_uri)[0] for value in subject_modules or []]
    metas = [read_module_meta(module_dir) for module_dir in module_dirs]
    if dwvss and not any(meta.get("uses_lora") for meta in metas):
        raise UserError("--dwvss: DWVSS schedules a CustomCrafter (LoRA) module's scale; none of the given "
                        "--subject-module folders has one (baselines and the base model sample at full strength)")
    speed, target = _speed_and_device(compile_mode, dtype, device)
    if no_dwvss:
        sample_config = sample_config.model_copy(update={"dwvss": None})
    elif dwvss:
        sample_config = _with_dwvss(sample_config, dwvss)
    pipe = load_base_pipeline(base_model, device=target)
    for value, module_dir in zip(subject_modules or [], module_dirs, strict=True):
        loaded = load_subject_module(pipe, module_dir)
        if loaded.token_mapping.get(loaded.meta["token"]) != loaded.meta["token"]:
            typer.echo(f"{value}: token {loaded.meta['token']} renamed to {loaded.token}", err=True)
    optimize_pipeline(pipe, speed)
    frames = sample_video(pipe, prompt, seed=seed, config=sample_config)
    (export_gif if out.suffix.lower() == ".gif" else export_mp4)(frames, out, fps=8)  # atomic: no half-written --out
    typer.echo(f"wrote {out} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]})")


@app.command("sample-eval-set")
def sample_eval_set_command(
    subject_module: str | None = typer.Option(None, "--subject-module", help="Subject module folder (or a training "
                                              "output holding subject_module/), or a registered one: "
                                              "models:/customcrafter-dog@champion, models:/NAME/3."),
    base: bool = typer.Option(False, "--base", help="The base model instead: the motion reference (fps 16)."),
    subject: str = typer.Option(..., "--subject", help="Subject folder (images + subject.yaml) the videos are "
                                                        "scored against, or a subject name under --data-root."),
    data_root: Path = typer.Option(Path("data"), "--data-root", help="The data folder a --subject name is looked "
                                                                     "up in (<data-root>/subjects/<name>)."),
    out: Path = typer.Option(..., "--out", help="Output folder, one per subject and method: videos + "
                                                 "manifest.jsonl (a rerun resumes)."),
    method: str | None = typer.Option(None, "--method", help="Method name in the manifest (default: the module's "
                                                             "method, or base)."),
    class_word: str | None = typer.Option(None, "--class-word", help="Class word; default: the module's, or "
                                                                     "subject.yaml's."),
    kind: str | None = typer.Option(None, "--kind", help="live | object (picks the prompts); default: the module's, "
                                                         "subject.yaml's, else object."),
    seeds: list[int] = typer.Option(None, "--seed", help="Seed (repeatable; default 0 1 2, as the pipeline)."),
    prompt_limit: int | None = typer.Option(None, "--prompt-limit", min=1, help="Only the first N evaluation "
                                                                                 "prompts (default: all ten)."),
    base_model: BaseModelOption = "VideoCrafter/VideoCrafter2",
    steps: StepsOption = None,
    config: ConfigOption = None,
    overrides: OverridesOption = None,
    device: DeviceOption = None,
    compile_mode: str = typer.Option("none", "--compile", help="GPU: none, regional or full (full pays off over "
                                                                "a whole evaluation set)."),
    dtype: DtypeOption = "bf16",
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Sample the evaluation prompts × seeds of one subject module (or --base) into --out for `evaluate`."""
    from customcrafter.config import load_config
    from customcrafter.data.subjects import find_subject_dir
    from customcrafter.loading import load_base_pipeline
    from customcrafter.performance import optimize_pipeline
    from customcrafter.sampling import (
        SampleConfig,
        evaluation_set_rows,
        resumed_module_origin,
        sample_evaluation_set,
    )
    from customcrafter.subject_module import load_subject_module, read_module_meta
    from customcrafter.training.dataset import resolve_subject
    from customcrafter.utils import file_in_the_way

    if (subject_module is None) == (not base):
        raise UserError("--subject-module DIR or --base: give exactly one (a module, or the base model as the motion "
                        "reference)")
    if kind is not None and kind not in ("live", "object"):
        raise UserError(f"--kind {kind!r}: must be 'live' or 'object'")
    # everything checkable is checked before minutes of loading the base model
    module_dir, origin = resolve_module_origin(subject_module, tracking_uri) if subject_module else (None, None)
    try:
        meta = read_module_meta(module_dir) if module_dir else {}
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"--subject-module {exc}") from None
    subject_dir = find_subject_dir(subject, data_root)
    try:
        info = resolve_subject(subject_dir, class_word or meta.get("class_word"), None, kind or meta.get("kind"))
    except ValueError as exc:
        raise UserError(f"--subject {exc}") from None
    method = method or meta.get("method", "base")
    seeds = list(seeds or [0, 1, 2])
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--seed {' '.join(map(str, seeds))}: give each seed once")
    if (blocker := file_in_the_way(out)) is not None:
        raise UserError(f"--out {out}: {blocker} is a file, not a folder" if blocker != out else
                        f"--out {out}: not a folder")
    try:  # the manifest is rewritten with this set's rows only: a rerun may resume, not mix sets
        held = {f"{row.get('method')}/{row.get('subject')}" for row in evaluation_set_rows(out)}
    except ValueError as exc:
        raise UserError(f"--out {out}: its manifest.jsonl is not one JSON object per line ({exc}); delete the "
                        "folder to sample afresh") from None
    if held - {f"{method}/{info.name}"}:
        raise UserError(f"--out {out}: holds the evaluation set of {', '.join(sorted(held))} (method/subject), "
                        f"not {method}/{info.name}; use one folder per subject and method")
    try:  # also checked by sample_evaluation_set, after minutes of loading
        resumed_module_origin(out, origin)
    except ValueError as exc:
        raise UserError(f"--subject-module {subject_module}: {exc}") from None
    sample_config = load_config(SampleConfig, config, overrides, num_inference_steps=steps)
    speed, target = _speed_and_device(compile_mode, dtype, device)
    pipe = load_base_pipeline(base_model, device=target)
    if module_dir:
        load_subject_module(pipe, module_dir)
    optimize_pipeline(pipe, speed)
    # what the pipeline's sample step calls: each video and then the manifest written to a temporary file and renamed,
    # so an interrupted run leaves whole videos, no new manifest (nothing half-written to score) and a rerun resumes
    manifest = sample_evaluation_set(pipe, method=method, subject=info.name, subject_dir=subject_dir, out_dir=out,
                                     seeds=seeds, prompt_limit=prompt_limit, config=sample_config,
                                     kind=info.kind, class_word=info.class_word, module_origin=origin)
    rows = sum(1 for line in manifest.read_text().splitlines() if line.strip())
    typer.echo(f"wrote {rows} videos of {info.name} ({method}) to {out}; score them with: customcrafter evaluate "
               f"--method-outputs {out} [more folders] --out EVAL_DIR")
