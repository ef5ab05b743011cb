"""`customcrafter convert`: an original VideoCrafter2 checkpoint → a diffusers folder."""

from __future__ import annotations

from pathlib import Path

import typer

from customcrafter.cli import UserError, app


@app.command("convert")
def convert(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Original model.ckpt (its state_dict) or .safetensors."),
    output: Path = typer.Option(..., "--output", "--out", help="Folder to write (must not exist unless --force)."),
    config: Path | None = typer.Option(None, "--config", help="Original YAML (e.g. inference_t2v_512_v2.0.yaml); "
                                       "default: VideoCrafter2's full-size model."),
    text_config: Path | None = typer.Option(None, "--text-config", help="JSON with the OpenCLIP text tower size "
                                            "(width, heads, layers, ...); default ViT-H-14."),
    components: str = typer.Option("unet,vae,text_encoder", "--components",
                                   help="Comma-separated subset of unet,vae,text_encoder."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --output."),
    ema: bool = typer.Option(False, "--ema/--no-ema", help="Convert the UNet's EMA weights (model_ema.*) of a "
                             "checkpoint trained with EMA instead of the trained ones (default; EMA keys skipped)."),
) -> None:
    """Convert a checkpoint; loads with VideoCrafter2Pipeline.from_pretrained / load_base_pipeline(folder)."""
    from customcrafter.convert import convert_checkpoint

    chosen = [c.strip() for c in components.split(",") if c.strip()]
    if output.exists() and not force:
        raise UserError(f"{output}: already exists (use --force to replace it)")
    convert_checkpoint(checkpoint, output, config=config, text_config=text_config, components=chosen,
                       overwrite=force, ema=ema)
    typer.echo(f"wrote {output}")
