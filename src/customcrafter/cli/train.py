"""`customcrafter train`: learn a subject module (CustomCrafter or a baseline) from a subject folder or name."""

from __future__ import annotations

from pathlib import Path

import typer

from customcrafter.cli import app


@app.command("train")
def train_command(
    subject: str = typer.Option(..., "--subject", help="Subject folder (images + subject.yaml, or bare images with "
                                                        "--class-word), or a subject name under --data-root; an "
                                                        "existing folder wins."),
    data_root: Path = typer.Option(Path("data"), "--data-root", help="The data folder a --subject name is looked "
                                                                     "up in (<data-root>/subjects/<name>)."),
    class_word: str | None = typer.Option(None, "--class-word", help="Class word (e.g. dog); default from "
                                                                     "subject.yaml."),
    kind: str | None = typer.Option(None, "--kind", help="live | object (picks evaluation prompts)."),
    token: str | None = typer.Option(None, "--token", help="Placeholder token; default <new1>."),
    method: str | None = typer.Option(None, "--method", help="customcrafter (default), custom_diffusion, "
                                                             "custom_diffusion_long, dreamvideo, dreamvideo_long."),
    base_model: str | None = typer.Option(None, "--base-model", help="'tiny', a hub id, a checkpoint or a folder "
                                                                     "(default VideoCrafter/VideoCrafter2)."),
    config: Path | None = typer.Option(None, "--config", help="TrainConfig YAML."),
    overrides: list[str] = typer.Option(None, "--set", help="Config override KEY=VALUE (repeatable)."),
    output: Path | None = typer.Option(None, "--output", "--out", help="Output folder (module + checkpoints); a finished "
                                                               "module there is kept unless --force."),
    force: bool = typer.Option(False, "--force", help="Replace a finished module in --output."),
) -> None:
    """Train a subject module; prints the module folder."""
    from customcrafter.config import load_config
    from customcrafter.data.subjects import find_subject_dir
    from customcrafter.training.config import TrainConfig
    from customcrafter.training.trainer import train

    subject_dir = find_subject_dir(subject, data_root)
    # the CLI keeps a finished module unless told (--force, or --set overwrite=true)
    train_config = load_config(TrainConfig, config, ["overwrite=false", *(overrides or [])],
                               subject_dir=str(subject_dir),
                               class_word=class_word, kind=kind, token=token, method=method, base_model=base_model,
                               output_dir=str(output) if output else None, overwrite=True if force else None)
    result = train(train_config)
    final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    typer.echo(f"subject module: {result.module_dir} ({result.steps} steps, {result.seconds:.0f}s, "
               f"final loss {final})")
