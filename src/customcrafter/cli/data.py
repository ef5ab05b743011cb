"""``customcrafter data ...``: add, list, validate and augment subject data (thin wrappers over customcrafter.data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from customcrafter.cli import UserError, app

data_app = typer.Typer(no_args_is_help=True, help="Subject data: add photos, list, validate (GX), augment.")
app.add_typer(data_app, name="data")


@data_app.command("add")
def add(
    photos_dir: Annotated[Path, typer.Argument(help="folder with 3-6 photos of the subject")],
    name: Annotated[str, typer.Option(help="subject name: lower-case letters, digits, '_' or '-'")],
    class_word: Annotated[str, typer.Option(help="what the subject is, e.g. 'dog', 'backpack'")],
    kind: Annotated[str | None, typer.Option(help="live | object (default: live for animals/people)")] = None,
    token: Annotated[str, typer.Option(help="placeholder token of the subject")] = "<new1>",
    force: Annotated[bool, typer.Option("--force", help="replace an existing subject of that name")] = False,
    data_root: Annotated[Path, typer.Option(help="the DVC-tracked data folder")] = Path("data"),
    min_images: Annotated[int, typer.Option(help="fewest usable photos accepted")] = 3,
    min_side: Annotated[int, typer.Option(help="shorter side in pixels")] = 256,
    max_side: Annotated[int, typer.Option(help="larger photos are downscaled to this longest side")] = 2048,
    source: Annotated[str | None, typer.Option(help="where the photos come from (recorded)")] = None,
    license: Annotated[str | None, typer.Option(help="licence of the photos (recorded)")] = None,
    dvc: Annotated[bool, typer.Option("--dvc/--no-dvc", help="run `dvc add` on the data folder")] = True,
) -> None:
    """Check, normalise and add a subject; then `dvc add` the data folder."""
    from customcrafter.data.images import ImageLimits
    from customcrafter.data.ingest import ingest_subject

    if kind is not None and kind not in ("live", "object"):
        raise UserError(f"--kind {kind!r}: must be 'live' or 'object'")
    limits = ImageLimits(min_side=min_side, max_side=max_side)
    result = ingest_subject(photos_dir, name, class_word, kind=kind, token=token, data_root=data_root, force=force,
                            limits=limits, min_images=min_images, source=source, license=license, run_dvc=dvc)
    typer.echo(f"{'replaced' if result.replaced else 'added'} subject {name!r}: {len(result.images)} images "
               f"-> {result.subject_dir}")
    for path in result.ignored:
        typer.echo(f"  ignored {path.name}")
    if result.dvc_file is not None:
        typer.echo("next steps:\n"
                   "  dvc push -r s3                 # upload the images to your team's remote (docs/DATA.md, Remotes;\n"
                   "                                 # the default remote, dvc-storage/, holds the sample subjects)\n"
                   f"  git add {result.dvc_file.name} && git commit -m 'data: add subject {name}'")
    else:
        typer.echo("DVC not updated (--no-dvc, or not inside a DVC repository): run `dvc add data` yourself.")


@data_app.command("list")
def list_(data_root: Annotated[Path, typer.Option(help="the data folder")] = Path("data")) -> None:
    """Subjects with their class word, kind, token and image count, and the data version."""
    from customcrafter.data.dvc_ops import find_dvc_root
    from customcrafter.data.subjects import (
        SubjectDataError,
        data_version,
        load_subject,
        subject_content_hash,
        subject_dirs,
    )

    folders = subject_dirs(data_root)
    if not folders:
        typer.echo(f"no subjects under {data_root / 'subjects'} (run `dvc pull`, or `customcrafter data add`)")
    else:
        typer.echo(f"{'subject':<20} {'class word':<16} {'kind':<7} {'token':<8} {'images':>6}  content")
    broken = 0
    for folder in folders:  # one broken subject is reported in its row, the others are still listed
        try:
            s = load_subject(folder)
            content = subject_content_hash(s.dir)[:12]
        except SubjectDataError as exc:
            broken += 1
            typer.echo(f"{folder.name:<20} does not load: {exc}")
            continue
        typer.echo(f"{s.name:<20} {s.class_word:<16} {s.kind:<7} {s.token:<8} {len(s.image_paths):>6}  {content}")
    repo_root = find_dvc_root(data_root) or Path.cwd()
    typer.echo(str(data_version(repo_root)))
    if broken:
        raise typer.Exit(1)


@data_app.command("validate")
def validate(
    data_root: Annotated[Path, typer.Option(help="the data folder")] = Path("data"),
    subject: Annotated[list[str] | None, typer.Option(help="validate only these subjects (repeatable): a name under "
                                                           "--data-root, or a subject folder (an existing folder "
                                                           "wins)")] = None,
    out: Annotated[Path, typer.Option(help="where validation.json and validation.html go")] = Path(
        "outputs/data_validation"),
    min_images: Annotated[int, typer.Option(help="images per subject")] = 3,
    min_side: Annotated[int, typer.Option(help="shorter side in pixels")] = 256,
) -> None:
    """Run the Great Expectations suites; exit 1 when a check fails."""
    from customcrafter.data.subjects import find_subject_dir
    from customcrafter.data.validate import ValidationConfig, validate_data

    config = ValidationConfig(min_images=min_images, min_side=min_side)
    folders = [find_subject_dir(value, data_root) for value in subject or []]
    result = validate_data(data_root, subjects=folders or None, out_dir=out, config=config)
    typer.echo(f"{result.n_subjects} subjects, {result.n_images} images, {result.seconds:.1f} s: "
               f"{'PASSED' if result.success else 'FAILED'}")
    for name, lines in sorted(result.problems.items()):
        for line in lines:
            typer.echo(f"  [{name}] {line}")
    typer.echo(f"results: {result.json_path}\n         {result.html_path}")
    if not result.success:
        raise typer.Exit(1)


@data_app.command("augment")
def augment(
    subject_dir: Annotated[Path, typer.Argument(help="a subject folder, e.g. data/subjects/dog")],
    out: Annotated[Path, typer.Option(help="output folder outside the data folder: new, empty, or earlier "
                                                  "examples (replaced)")],
    num: Annotated[int, typer.Option(help="number of examples")] = 16,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    config: Annotated[Path | None, typer.Option(help="AugmentConfig YAML")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. zoom_range=paper")] = None,
) -> None:
    """Materialise augmented training examples (image, mask, prompt) and a preview grid."""
    from customcrafter.config import load_config
    from customcrafter.data.augment import AugmentConfig, materialise_examples

    augment_config = load_config(AugmentConfig, config, set_)
    out_dir = materialise_examples(subject_dir, out, num_examples=num, seed=seed, config=augment_config)
    typer.echo(f"wrote {num} examples to {out_dir} (preview: {out_dir / 'preview.png'})")
