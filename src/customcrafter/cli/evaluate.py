"""`customcrafter evaluate`: score method outputs and write the comparison report."""

from __future__ import annotations

from pathlib import Path

import typer

from customcrafter.cli import UserError, app


@app.command("evaluate")
def evaluate_command(
    method_outputs: list[Path] = typer.Option(
        ...,
        "--method-outputs",
        help="Sampling output folder(s) holding manifest.jsonl. Several "
        "folders: --method-outputs A B C (or repeat the flag).",
    ),
    more_outputs: list[Path] = typer.Argument(None, help="More method output folders.", show_default=False),
    out: Path = typer.Option(..., "--out", help="Output folder (tables, report.html, summary.md, cache)."),
    config: Path | None = typer.Option(None, "--config", help="EvalConfig YAML."),
    clip_model: str | None = typer.Option(None, "--clip-model", help="CLIP hub id or local folder."),
    dino_model: str | None = typer.Option(None, "--dino-model", help="DINO hub id or local folder."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N."),
    overrides: list[str] = typer.Option(None, "--set", help="Config override KEY=VALUE (repeatable)."),
) -> None:
    """Score every video of the given method folders (CLIP-T, CLIP-I, DINO-I, temporal consistency, motion)."""
    from customcrafter.config import load_config
    from customcrafter.evaluation.config import EvalConfig
    from customcrafter.evaluation.protocol import evaluate
    from customcrafter.utils import file_in_the_way

    method_dirs = [*method_outputs, *(more_outputs or [])]
    for method_dir in method_dirs:
        if not method_dir.is_dir():
            raise UserError(f"{method_dir}: method output folder not found")
    if (blocker := file_in_the_way(out)) is not None:
        raise UserError(f"--out {out}: {blocker} is a file, not a folder")
    eval_config = load_config(
        EvalConfig, config, overrides, clip_model=clip_model, dino_model=dino_model, device=device
    )
    result = evaluate(method_dirs, out, eval_config)
    typer.echo(result.summary_md.read_text())
    typer.echo(f"report: {result.report_html}")
