"""``customcrafter data add``: turn a folder of user photos into a clean, versioned subject.

Order matters for the "nothing half-written" promise: every file is checked first and *all* problems are reported
together; only when there are none is the subject folder written (atomically, via a temporary folder and a
rename), and then ``dvc add data`` runs. If DVC fails, the new folder is removed and a replaced one restored.

Output images are JPEG, quality 95, 4:4:4 chroma, without metadata: small enough to keep the DVC remote light,
visually lossless at training resolution, and free of EXIF (phone photos carry GPS positions). The EXIF
orientation is applied to the pixels first, so nothing is lost.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from customcrafter.data.dvc_ops import dvc_add, find_dvc_root
from customcrafter.data.images import ImageLimits, ImageRejected, normalise_image, open_checked
from customcrafter.data.subjects import (
    IMAGE_SUFFIXES,
    SUBJECT_FILE,
    SubjectMeta,
    check_subject_name,
    is_ignored_file,
    iter_image_files,
    sha256_file,
    subject_dirs,
)
from customcrafter.utils import atomic_dir

logger = logging.getLogger(__name__)

__all__ = ["IngestError", "IngestResult", "ingest_subject", "infer_kind"]

#: Extensions of image formats we know but do not accept: rejected with a hint instead of silently skipped.
UNSUPPORTED_IMAGE_SUFFIXES = frozenset({".heic", ".heif", ".avif", ".gif", ".bmp", ".raw", ".cr2", ".nef", ".dng"})
#: Class words whose subjects are "live" (the evaluation uses the live prompt set for them).
LIVE_CLASS_WORDS = frozenset({"dog", "cat", "puppy", "kitten", "person", "man", "woman", "boy", "girl", "child",
                              "baby", "bird", "horse", "rabbit", "hamster", "parrot", "animal"})
JPEG_OPTIONS = {"format": "JPEG", "quality": 95, "subsampling": 0}  # no optimize: it fails on large images


class IngestError(ValueError):
    """Photos that cannot become a subject; ``problems`` lists every bad file (or setting) with its reason."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n  ".join(problems)
        super().__init__(f"cannot add the subject ({len(problems)} problem(s)):\n  {lines}")


@dataclass
class IngestResult:
    subject_dir: Path
    images: list[Path]
    sources: list[Path]
    ignored: list[Path] = field(default_factory=list)
    dvc_file: Path | None = None
    replaced: bool = False




def infer_kind(class_word: str) -> str:
    return "live" if class_word.strip().lower() in LIVE_CLASS_WORDS else "object"


def _collect_files(photos_dir: Path) -> tuple[list[Path], list[Path], list[str]]:
    """Candidate images, ignored entries, and problems found from names and links alone."""
    candidates, ignored, problems = [], [], []
    root = photos_dir.resolve()
    for entry in sorted(photos_dir.iterdir()):
        if is_ignored_file(entry):
            ignored.append(entry)
            continue
        if entry.is_symlink() and not entry.resolve().is_relative_to(root):
            problems.append(f"{entry}: symlink pointing outside the subject folder (-> {entry.resolve()})")
            continue
        if entry.is_symlink() and not entry.exists():
            problems.append(f"{entry}: broken symlink (-> {entry.readlink()})")
            continue
        if entry.is_dir():
            ignored.append(entry)
            continue
        suffix = entry.suffix.lower()
        if suffix in UNSUPPORTED_IMAGE_SUFFIXES:
            problems.append(f"{entry}: unsupported format {suffix} (convert to JPEG, PNG, WebP or TIFF)")
        elif suffix in IMAGE_SUFFIXES:
            candidates.append(entry)
        else:
            ignored.append(entry)
    return candidates, ignored, problems


def _encoded(image) -> bytes:
    """The bytes the subject's ``NN.jpg`` will hold."""
    buffer = io.BytesIO()
    image.save(buffer, **JPEG_OPTIONS)
    return buffer.getvalue()


def _stored_elsewhere(encoded: list[bytes], sources: list[Path], data_root: Path, name: str) -> list[str]:
    """Problems for photos whose stored file would repeat an image of another subject: validation requires every
    image's sha256 to be unique across subjects (a photo filed under two subjects is a mistake)."""
    stored = {sha256_file(path): path for folder in subject_dirs(data_root) if folder.name != name
              for path in iter_image_files(folder)}
    problems = []
    for data, source in zip(encoded, sources, strict=True):
        twin = stored.get(hashlib.sha256(data).hexdigest())
        if twin is not None:
            problems.append(f"{source}: the same image is already stored as {twin} (subject {twin.parent.name!r})")
    return problems


def ingest_subject(photos_dir: str | Path, name: str, class_word: str, *, kind: str | None = None,
                   token: str = "<new1>", data_root: str | Path = "data", force: bool = False,
                   limits: ImageLimits | None = None, min_images: int = 3, prompts: list[str] | None = None,
                   source: str | None = None, license: str | None = None, run_dvc: bool = True) -> IngestResult:
    """Check, normalise and write ``photos_dir`` as ``data_root/subjects/<name>``, then ``dvc add data_root``.

    Raises :class:`IngestError` listing every problem (bad files with their reasons, too few images, bad name,
    clash with an existing subject without ``force``); nothing is written in that case. ``kind`` defaults to
    "live" for animal/person class words and "object" otherwise. ``run_dvc=False`` skips the DVC update; it is also
    skipped, with a warning, when ``data_root`` is not inside a DVC repository.
    """
    limits = limits or ImageLimits()
    photos_dir, data_root = Path(photos_dir), Path(data_root)
    try:
        check_subject_name(name, "subject name")
    except ValueError as exc:
        raise IngestError([str(exc)]) from None
    if not photos_dir.is_dir():
        raise IngestError([f"{photos_dir}: photos folder not found"])
    try:
        meta = SubjectMeta(name=name, class_word=class_word, token=token, kind=kind or infer_kind(class_word),
                           prompts=prompts or [], source=source, license=license)
    except ValidationError as exc:
        raise IngestError([f"subject settings: {err['loc'][0]}: {err['msg']}" for err in exc.errors()]) from None
    target = data_root / "subjects" / name
    if target.exists() and not force:
        raise IngestError([f"subject {name!r} already exists at {target} (use --force to replace it)"])

    candidates, ignored, problems = _collect_files(photos_dir)
    for path in ignored:
        logger.info("ignoring %s", path)
    images, sources, seen = [], [], {}
    for path in candidates:
        try:
            image = open_checked(path, limits)
        except ImageRejected as exc:
            problems.append(str(exc))
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            problems.append(f"{path}: duplicate of {seen[digest].name}")
            continue
        seen[digest] = path
        normalised = normalise_image(image, limits.max_side)
        if min(normalised.size) < limits.min_side:  # what validation checks is the stored image
            problems.append(f"{path}: {normalised.width}x{normalised.height} once downscaled to max side "
                            f"{limits.max_side}, below min side {limits.min_side}")
            continue
        images.append(normalised)
        sources.append(path)
    encoded = [_encoded(image) for image in images]
    stored: dict[str, Path] = {}
    for data, source in zip(encoded, sources, strict=True):  # different files, same picture: same stored bytes
        twin = stored.setdefault(hashlib.sha256(data).hexdigest(), source)
        if twin is not source:
            problems.append(f"{source}: duplicate of {twin.name} (the same picture once stored)")
    problems += _stored_elsewhere(encoded, sources, data_root, name)
    if not candidates and not problems:
        problems.append(f"{photos_dir}: no images found (accepted: {', '.join(sorted(IMAGE_SUFFIXES))})")
    elif len(images) < min_images:
        problems.append(f"{photos_dir}: {len(images)} usable image(s), need at least {min_images}")
    if problems:
        raise IngestError(problems)

    backup = None
    if target.exists():  # --force: keep the old subject outside data/ until the new one is versioned
        backup = Path(tempfile.mkdtemp(prefix=f".replaced-{name}-", dir=data_root.resolve().parent)) / name
        target.rename(backup)
    written: list[Path] = []
    try:
        with atomic_dir(target) as tmp:
            for index, data in enumerate(encoded):
                out = tmp / f"{index:02d}.jpg"
                out.write_bytes(data)
                written.append(target / out.name)
            (tmp / SUBJECT_FILE).write_text(yaml.safe_dump(meta.model_dump(exclude_none=True), sort_keys=False))
        dvc_file = None
        if run_dvc:
            if find_dvc_root(data_root) is None:
                logger.warning("%s is not inside a DVC repository: skipped `dvc add`", data_root)
            else:
                dvc_file = dvc_add(data_root)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        if backup is not None:
            backup.rename(target)
        raise
    finally:
        if backup is not None:
            shutil.rmtree(backup.parent, ignore_errors=True)
    logger.info("added subject %s: %d images -> %s", name, len(written), target)
    return IngestResult(subject_dir=target, images=written, sources=sources, ignored=ignored, dvc_file=dvc_file,
                        replaced=backup is not None)
