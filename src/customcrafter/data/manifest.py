"""The data manifest: one row per image and one per subject, as pandas DataFrames (what the GX suites check).

Building it never raises on bad data: a broken file or ``subject.yaml`` becomes a row that fails an expectation,
so one validation run reports every problem at once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import yaml

from customcrafter.data.images import ImageLimits, inspect_image
from customcrafter.data.subjects import (
    SUBJECT_FILE,
    SubjectDataError,
    is_ignored_file,
    iter_image_files,
    read_subject_meta,
)

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_COLUMNS", "SUBJECT_COLUMNS", "build_manifest", "subject_dirs"]

IMAGE_COLUMNS = ["subject", "path", "format", "mode", "width", "height", "bytes", "sha256", "exif_orientation",
                 "decodable", "error", "min_side", "aspect"]
SUBJECT_COLUMNS = ["subject", "folder_name", "class_word", "token", "kind", "n_images", "yaml_ok", "yaml_error"]


def subject_dirs(data_root: str | Path, subjects: list[str | Path] | None = None) -> list[Path]:
    """Subject folders under ``data_root/subjects`` (all, or the given ones: a ``str`` is a name there, a ``Path`` a
    folder anywhere; a missing one is an error)."""
    base = Path(data_root) / "subjects"
    if subjects:
        folders = [s if isinstance(s, Path) else base / s for s in subjects]
        missing = [str(s) for s, folder in zip(subjects, folders, strict=True) if not folder.is_dir()]
        if missing:
            raise FileNotFoundError(f"{base}: no subject folder for {', '.join(missing)}")
        return folders
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no subjects folder (add one with `customcrafter data add`)")
    return [p for p in sorted(base.iterdir()) if p.is_dir() and not is_ignored_file(p)]


def _subject_row(folder: Path, n_images: int) -> dict:
    row = {"subject": folder.name, "folder_name": folder.name, "class_word": None, "token": None, "kind": None,
           "n_images": n_images, "yaml_ok": True, "yaml_error": None}
    try:
        meta = read_subject_meta(folder / SUBJECT_FILE)
        row.update(subject=meta.name, class_word=meta.class_word, token=meta.token, kind=meta.kind)
        if meta.name != folder.name:
            row.update(yaml_ok=False, yaml_error=f"name {meta.name!r} differs from the folder name")
    except SubjectDataError as exc:
        row.update(yaml_ok=False, yaml_error=str(exc))
        # Keep what can be read, so the class word / token expectations still say something useful.
        try:
            raw = yaml.safe_load((folder / SUBJECT_FILE).read_text()) or {}
            if isinstance(raw, dict):
                row.update({k: raw.get(k) for k in ("class_word", "token", "kind") if raw.get(k) is not None})
                row["token"] = row["token"] or "<new1>"
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            pass
    return row


def build_manifest(data_root: str | Path, subjects: list[str] | None = None,
                   limits: ImageLimits | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return ``(images, subjects)`` DataFrames with :data:`IMAGE_COLUMNS` and :data:`SUBJECT_COLUMNS`."""
    image_rows, subject_rows = [], []
    for folder in subject_dirs(data_root, subjects):
        files = iter_image_files(folder)
        for path in files:
            image_rows.append(inspect_image(path, subject=folder.name, limits=limits).as_row())
        subject_rows.append(_subject_row(folder, len(files)))
    images = pd.DataFrame(image_rows, columns=IMAGE_COLUMNS[:-2])
    sides = images[["width", "height"]].astype("float64")
    images["min_side"] = sides.min(axis=1)
    images["aspect"] = sides.max(axis=1) / sides.min(axis=1)
    logger.info("manifest: %d images in %d subjects", len(images), len(subject_rows))
    return images, pd.DataFrame(subject_rows, columns=SUBJECT_COLUMNS)
