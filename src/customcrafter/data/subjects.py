"""The subject layout on disk, read quickly and checked structurally.

``data/subjects/<name>/`` holds a subject's normalised images (``00.jpg``, ``01.jpg``, ...) and ``subject.yaml``::

    name: dog
    class_word: dog
    token: <new1>
    kind: live          # live | object (picks the evaluation prompt set)
    prompts: []         # optional extra prompts, with a {subject} placeholder
    source: DreamBooth dataset (Ruiz et al., CVPR 2023)
    license: CC-BY-4.0

:func:`load_subject` is what the trainer calls, so it does cheap checks only (no image decoding, no Great
Expectations); the full checks live in :mod:`customcrafter.data.validate`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ValidationError, field_validator

from customcrafter.config import StrictModel

logger = logging.getLogger(__name__)

__all__ = [
    "SubjectDataError",
    "SubjectMeta",
    "Subject",
    "DataVersion",
    "load_subject",
    "find_subject_dir",
    "list_subjects",
    "subject_dirs",
    "files_digest",
    "sha256_file",
    "subject_content_hash",
    "data_version",
    "iter_image_files",
    "is_ignored_file",
    "SUBJECT_FILE",
    "IMAGE_SUFFIXES",
    "NAME_PATTERN",
    "check_subject_name",
    "TOKEN_PATTERN",
    "CLASS_WORD_PATTERN",
]

SUBJECT_FILE = "subject.yaml"
#: Extensions of the accepted image formats (JPEG, PNG, WebP, TIFF).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff"})
#: Files that operating systems drop into folders; never images, always ignored.
SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
#: A subject name is a single safe path component: it can never escape data/ or be hidden.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
#: The placeholder token, e.g. "<new1>": one new tokenizer entry.
TOKEN_PATTERN = r"^<[a-z0-9_]+>$"
#: A class word goes into prompts ("<new1> dog"): letters first, then letters, digits, spaces, "-" or "'".
CLASS_WORD_PATTERN = r"^[A-Za-z][A-Za-z0-9 '\-]{0,63}$"


def check_subject_name(value: object, argument: str = "subject") -> str:
    """``value`` when it is a subject name (:data:`NAME_PATTERN`); else a ValueError naming ``argument``. A name
    becomes the folder ``subjects/<name>`` wherever subjects are read, copied or written, and reaches the cluster
    as a run parameter: ``..``, ``/`` or a leading ``.`` would escape the data or the output."""
    if not isinstance(value, str) or not re.fullmatch(NAME_PATTERN, value):
        raise ValueError(f"{argument}: {value!r} is not a subject name (lower-case letters, digits, '_' or '-', "
                         "starting with a letter or digit, at most 64 characters; no '/', '..' or leading '.')")
    return value


class SubjectDataError(ValueError):
    """A subject folder is unusable; the message names the file and the reason."""


class SubjectMeta(StrictModel):
    """The contents of ``subject.yaml``."""

    name: str
    class_word: str
    token: str = "<new1>"
    kind: Literal["live", "object"] = "object"
    prompts: list[str] = []
    source: str | None = None
    license: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_subject_name(value, "name")

    @field_validator("class_word")
    @classmethod
    def _class_word(cls, value: str) -> str:
        value = value.strip()
        if not re.fullmatch(CLASS_WORD_PATTERN, value):
            raise ValueError(f"{value!r} is not a usable class word (e.g. 'dog', 'stuffed animal')")
        return value

    @field_validator("token")
    @classmethod
    def _token(cls, value: str) -> str:
        if not re.fullmatch(TOKEN_PATTERN, value):
            raise ValueError(f"{value!r} is not a well-formed token (expected e.g. '<new1>')")
        return value


@dataclass(frozen=True)
class Subject:
    """A subject folder, read. ``image_paths`` are sorted by file name."""

    name: str
    class_word: str
    token: str
    kind: str
    image_paths: list[Path]
    prompts: list[str] = field(default_factory=list)
    source: str | None = None
    license: str | None = None
    dir: Path | None = None

    @property
    def instance_prompt(self) -> str:
        """"<new1> dog": the phrase the method's caption templates wrap."""
        return f"{self.token} {self.class_word}"


def is_ignored_file(path: Path) -> bool:
    """Hidden files (``.DS_Store``, macOS ``._x`` forks, ...) and Windows system files are never data."""
    return path.name.startswith(".") or path.name.lower() in SYSTEM_FILES


def iter_image_files(folder: Path) -> list[Path]:
    """Files in ``folder`` with an accepted image extension, not ignored, sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if not is_ignored_file(p) and p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())


def read_subject_meta(path: Path) -> SubjectMeta:
    """Parse and validate a ``subject.yaml``; errors name the file and the field."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SubjectDataError(f"{path}: missing (every subject folder needs a {SUBJECT_FILE})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SubjectDataError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise SubjectDataError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return SubjectMeta.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise SubjectDataError(f"{path}: {problems}") from None


def load_subject(subject_dir: str | Path, min_images: int = 1) -> Subject:
    """Read a subject folder, with cheap structural checks (no decoding): fast enough to call at train start.

    Raises :class:`SubjectDataError` when the folder or ``subject.yaml`` is missing or invalid, the name in the
    file differs from the folder's, an image is empty or a symlink leaving the folder, or there are fewer than
    ``min_images`` images.
    """
    folder = Path(subject_dir)
    if not folder.is_dir():
        raise SubjectDataError(f"{folder}: subject folder not found")
    meta = read_subject_meta(folder / SUBJECT_FILE)
    if meta.name != folder.name:
        raise SubjectDataError(f"{folder / SUBJECT_FILE}: name {meta.name!r} differs from the folder name "
                               f"{folder.name!r}")
    images = iter_image_files(folder)
    root = folder.resolve()
    for image in images:
        if image.is_symlink() and not image.resolve().is_relative_to(root):
            raise SubjectDataError(f"{image}: symlink pointing outside the subject folder")
        if not image.exists():
            raise SubjectDataError(f"{image}: broken symlink")
        if image.stat().st_size == 0:
            raise SubjectDataError(f"{image}: empty file")
    if len(images) < min_images:
        raise SubjectDataError(f"{folder}: {len(images)} image(s), need at least {min_images}")
    return Subject(name=meta.name, class_word=meta.class_word, token=meta.token, kind=meta.kind,
                   image_paths=images, prompts=list(meta.prompts), source=meta.source, license=meta.license,
                   dir=folder)


def find_subject_dir(value: str | Path, data_root: str | Path = "data", option: str = "--subject") -> Path:
    """The folder a ``--subject`` value means: an existing folder is that folder; otherwise a subject name, looked up
    as ``data_root/subjects/<name>``. Neither is a :class:`SubjectDataError` naming ``option``, the value and what
    was tried."""
    folder, named = Path(value), Path(data_root) / "subjects" / str(value)
    if str(value) and folder.is_dir():
        return folder
    is_name = re.fullmatch(NAME_PATTERN, str(value)) is not None
    if is_name and named.is_dir():
        return named
    tried = f"folder {folder}, subject {named}" if is_name else f"folder {folder}; not a subject name"
    known = ", ".join(p.name for p in subject_dirs(data_root)) or "none"
    raise SubjectDataError(f"{option} {str(value)!r}: neither a folder nor a subject under {named.parent} (tried "
                           f"{tried}; subjects there: {known})")


def list_subjects(data_root: str | Path = "data") -> list[Subject]:
    """Every subject under ``data_root/subjects``, sorted by name (an empty list when there is none)."""
    return [load_subject(p) for p in subject_dirs(data_root)]


def subject_dirs(data_root: str | Path = "data") -> list[Path]:
    """The subject folders under ``data_root/subjects``, sorted by name, loaded or not (none when it is missing)."""
    subjects_dir = Path(data_root) / "subjects"
    if not subjects_dir.is_dir():
        return []
    return sorted(p for p in subjects_dir.iterdir() if p.is_dir() and not is_ignored_file(p))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def subject_content_hash(subject_dir: str | Path) -> str:
    """sha256 over the images and ``subject.yaml`` (names and bytes): changes whenever the subject's data does."""
    folder = Path(subject_dir)
    files = iter_image_files(folder) + [folder / SUBJECT_FILE]
    for path in files:
        if not path.is_file():
            raise SubjectDataError(f"{path}: missing")
    return files_digest(files)


def files_digest(paths: list[Path]) -> str:
    """sha256 over the files' names and bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{Path(path).name}\0{sha256_file(Path(path))}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class DataVersion:
    """Which data: the md5 DVC recorded for ``data/`` (in ``data.dvc``) and the git revision, when available.

    ``modified`` is True when the workspace's data are not what that revision records: ``data/`` differs from
    ``data.dvc`` (not yet ``dvc add``-ed) or ``data.dvc`` differs from the commit (not yet committed); None when
    that cannot be told. :attr:`label` is what a model trained from it should record.
    """

    dvc_md5: str | None
    git_revision: str | None
    nfiles: int | None = None
    modified: bool | None = None

    @property
    def label(self) -> str | None:
        """The git revision, with ``-dirty`` appended (as ``git describe --dirty`` does) when modified."""
        if self.git_revision is None:
            return None
        return f"{self.git_revision}-dirty" if self.modified else self.git_revision

    def __str__(self) -> str:
        md5 = self.dvc_md5 or "untracked"
        rev = f" @ git {self.git_revision[:10]}" if self.git_revision else ""
        dirty = " (workspace modified: not what this revision records)" if self.modified else ""
        return f"data md5 {md5}{rev}{dirty}"


def data_version(repo_root: str | Path = ".") -> DataVersion:
    """Read ``data.dvc``'s ``outs`` md5, the git HEAD of ``repo_root`` and whether the workspace's data differ from
    them (None for what is missing)."""
    root = Path(repo_root)
    md5 = nfiles = None
    dvc_file = root / "data.dvc"
    if dvc_file.is_file():
        try:
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
        except yaml.YAMLError as exc:
            raise SubjectDataError(f"{dvc_file}: not valid YAML ({exc})") from None
        if outs:
            md5, nfiles = outs[0].get("md5"), outs[0].get("nfiles")
    revision = _git(root, "rev-parse", "HEAD") or None
    modified = None
    if revision is not None and dvc_file.is_file():
        from customcrafter.data.dvc_ops import dvc_modified

        uncommitted = _git(root, "status", "--porcelain", "--", "data.dvc")
        workspace = dvc_modified(dvc_file)
        modified = None if uncommitted is None or workspace is None else bool(uncommitted) or workspace
    return DataVersion(dvc_md5=md5, git_revision=revision, nfiles=nfiles, modified=modified)


def _git(root: Path, *args: str) -> str | None:
    """``git -C root <args>``'s output, stripped; None when git is missing or fails (e.g. not a repository)."""
    try:
        result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                check=False)
    except (OSError, subprocess.TimeoutExpired):
        logger.debug("git not available for %s", root)
        return None
    return result.stdout.strip() if result.returncode == 0 else None
