"""Ingestion: each bad input is rejected by name with nothing written; each odd-but-valid input is normalised."""

from __future__ import annotations

import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli
from PIL import Image

from customcrafter.data.images import ImageLimits
from customcrafter.data.ingest import IngestError, ingest_subject
from customcrafter.data.subjects import SubjectDataError, load_subject, subject_content_hash


def _photo(path: Path, size=(400, 300), seed=0, mode="RGB", **save) -> Path:
    array = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path, **save)
    return path


def _good_folder(folder: Path, n=3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _photo(folder / f"img{i}.jpg", seed=i)
    return folder


def _bomb_png(path: Path, width=20000, height=20000) -> Path:
    """A PNG whose header claims width x height but holds almost no data: the pixels must never be decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))
    return path


def _ingest(photos, tmp_path, name="pet", **kw):
    return ingest_subject(photos, name, "dog", data_root=tmp_path / "data", run_dvc=False, **kw)


def _assert_rejected(photos, tmp_path, expected_file: str | None, reason: str, **kw):
    with pytest.raises(IngestError) as info:
        _ingest(photos, tmp_path, **kw)
    matching = [p for p in info.value.problems if reason in p and (expected_file is None or expected_file in p)]
    assert matching, f"no problem naming {expected_file!r} with {reason!r} in {info.value.problems}"
    data = tmp_path / "data"
    assert not data.exists() or not any(data.rglob("*")), "something was written on rejection"


BAD_FILES = {
    "truncated.jpg": (lambda p: p.write_bytes(_photo(p, quality=95).read_bytes()[:3000]), "corrupt or truncated"),
    "notes.png": (lambda p: p.write_text("this is not an image\n" * 10), "not an image"),
    "empty.jpg": (lambda p: p.write_bytes(b""), "empty file"),
    "bomb.png": (_bomb_png, "decompression bomb"),
    "tiny.jpg": (lambda p: _photo(p, size=(200, 150)), "too small"),
    "banner.jpg": (lambda p: _photo(p, size=(2000, 400)), "too elongated"),
    "photo.heic": (lambda p: p.write_bytes(b"\0\0\0\x18ftypheic"), "unsupported format"),
    "anim.gif": (lambda p: _photo(Path(str(p)), mode="P"), "unsupported format"),
}


@pytest.mark.parametrize("filename", sorted(BAD_FILES))
def test_bad_file_is_named_and_nothing_written(tmp_path, filename):
    photos = _good_folder(tmp_path / "photos")
    make, reason = BAD_FILES[filename]
    make(photos / filename)
    _assert_rejected(photos, tmp_path, filename, reason)


def test_bomb_refused_without_decoding(tmp_path, monkeypatch):
    photos = _good_folder(tmp_path / "photos")
    _bomb_png(photos / "bomb.png")
    from customcrafter.data.images import ImageRejected, open_checked

    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(ImageRejected, match=r"bomb\.png: too many pixels \(20000x20000 = 400 MP > 64 MP\)"):
        open_checked(photos / "bomb.png")
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's own guard is restored afterwards


def test_all_problems_reported_together(tmp_path):
    photos = _good_folder(tmp_path / "photos", n=3)
    (photos / "a.jpg").write_bytes(b"")
    (photos / "b.png").write_text("nope")
    with pytest.raises(IngestError) as info:
        _ingest(photos, tmp_path)
    assert len([p for p in info.value.problems if "a.jpg" in p or "b.png" in p]) == 2


def test_folder_level_rejections(tmp_path):
    _assert_rejected(_good_folder(tmp_path / "two", n=2), tmp_path, "two", "2 usable image(s), need at least 3")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"junk")
    _assert_rejected(tmp_path / "empty", tmp_path, "empty", "no images found")
    _assert_rejected(tmp_path / "missing", tmp_path, "missing", "photos folder not found")
    dup = _good_folder(tmp_path / "dup")
    (dup / "copy.jpg").write_bytes((dup / "img0.jpg").read_bytes())
    _assert_rejected(dup, tmp_path, "img0.jpg", "duplicate of copy.jpg")


def test_symlink_outside_is_rejected(tmp_path):
    photos = _good_folder(tmp_path / "photos")
    outside = _photo(tmp_path / "secret.jpg", seed=9)
    os.symlink(outside, photos / "link.jpg")
    _assert_rejected(photos, tmp_path, "link.jpg", "symlink pointing outside the subject folder")


def test_broken_symlink_is_named_not_a_crash(tmp_path):
    """A dangling link (a photo moved away, a cloud-synced placeholder) is a named problem in data add, load_subject
    and validation; it used to end each of them with a bare '[Errno 2] No such file or directory'."""
    from customcrafter.data.validate import validate_data

    photos = _good_folder(tmp_path / "photos", n=4)
    os.symlink("gone.jpg", photos / "link.jpg")
    _assert_rejected(photos, tmp_path, "link.jpg", "broken symlink (-> gone.jpg)")
    (photos / "link.jpg").unlink()
    subject = _ingest(photos, tmp_path).subject_dir
    os.symlink("gone.jpg", subject / "99.jpg")
    with pytest.raises(SubjectDataError, match=r"99\.jpg: broken symlink"):
        load_subject(subject)
    result = validate_data(tmp_path / "data", out_dir=tmp_path / "validation")
    assert not result.success
    assert any("99.jpg (unreadable (No such file or directory))" in p for p in result.problems["pet"]), result.problems


@pytest.mark.parametrize("name", ["..", "../escape", "a/b", "/abs", ".hidden", "", "UPPER", "x" * 80])
def test_unsafe_names_rejected(tmp_path, name):
    _assert_rejected(_good_folder(tmp_path / "photos"), tmp_path, None, "not a subject name", name=name)


def test_bad_settings_rejected(tmp_path):
    photos = _good_folder(tmp_path / "photos")
    _assert_rejected(photos, tmp_path, None, "token", token="new1")
    with pytest.raises(IngestError, match="class_word"):
        ingest_subject(photos, "pet", "", data_root=tmp_path / "data", run_dvc=False)


def test_clash_needs_force_and_force_replaces(tmp_path):
    photos = _good_folder(tmp_path / "photos")
    first = _ingest(photos, tmp_path)
    before = subject_content_hash(first.subject_dir)
    with pytest.raises(IngestError, match="already exists.*--force"):
        _ingest(photos, tmp_path)
    assert subject_content_hash(first.subject_dir) == before
    more = _good_folder(tmp_path / "more", n=4)
    second = _ingest(more, tmp_path, force=True)
    assert second.replaced and len(load_subject(second.subject_dir).image_paths) == 4
    assert sorted(p.name for p in (tmp_path / "data" / "subjects").iterdir()) == ["pet"]  # no leftovers
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".replaced")]


def _exif_rotated_jpeg(path: Path) -> Path:
    """A 400x300 image stored with EXIF orientation 6 (display rotated 90 degrees clockwise): shows as 300x400."""
    array = np.zeros((300, 400, 3), dtype=np.uint8)
    array[:, :200] = (255, 0, 0)  # left half red as stored -> top half red when displayed
    array[:, 200:] = (0, 0, 255)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=95)
    return path


def test_normalisation_modes_orientation_and_downscale(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(photos / "a_cmyk.jpg")
    Image.fromarray(rgb).convert("L").save(photos / "b_gray.png")
    Image.fromarray(rgb).convert("P").save(photos / "c_palette.png")
    rgba = np.dstack([rgb, np.zeros((300, 400), dtype=np.uint8)])  # fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(photos / "d_rgba.png")
    # white, 16-bit (another size than d_rgba's white: the same picture twice would be a duplicate)
    Image.fromarray(np.full((310, 400), 65535, dtype=np.uint16)).save(photos / "e_16bit.png")
    _exif_rotated_jpeg(photos / "f_rotated.jpg")
    _photo(photos / "g_big.webp", size=(3000, 2000))
    _photo(photos / "h_scan.tiff", size=(500, 400), seed=3)
    (photos / ".DS_Store").write_bytes(b"\0\1")
    (photos / "._f_rotated.jpg").write_bytes(b"\0\1")
    (photos / "Thumbs.db").write_bytes(b"\0\1")

    result = _ingest(photos, tmp_path, limits=ImageLimits(max_side=2048))
    assert [p.name for p in result.images] == [f"{i:02d}.jpg" for i in range(8)]
    assert {p.name for p in result.ignored} == {".DS_Store", "._f_rotated.jpg", "Thumbs.db"}
    opened = {src.name: Image.open(out) for src, out in zip(result.sources, result.images, strict=True)}
    for im in opened.values():
        assert im.mode == "RGB" and im.format == "JPEG" and not im.getexif()
    assert np.asarray(opened["d_rgba.png"]).min() >= 250  # composited on white
    assert np.asarray(opened["e_16bit.png"]).min() >= 250  # 16-bit white stays white, not clipped garbage
    rotated = np.asarray(opened["f_rotated.jpg"]).astype(int)
    assert opened["f_rotated.jpg"].size == (300, 400)
    assert rotated[:150, :, 0].mean() > 200 and rotated[250:, :, 2].mean() > 200  # red on top, blue below
    assert opened["g_big.webp"].size == (2048, 1365)
    subject = load_subject(result.subject_dir)
    assert (subject.name, subject.class_word, subject.token, subject.kind) == ("pet", "dog", "<new1>", "live")


def test_load_subject_errors_name_file_and_reason(tmp_path):
    folder = _good_folder(tmp_path / "dog")
    with pytest.raises(SubjectDataError, match=r"dog/subject\.yaml: missing"):
        load_subject(folder)
    (folder / "subject.yaml").write_text("name: dog\nclass_word: dog\ntoken: new1\n")
    with pytest.raises(SubjectDataError, match=r"subject\.yaml: token: .*not a well-formed token"):
        load_subject(folder)
    (folder / "subject.yaml").write_text("name: cat\nclass_word: dog\n")
    with pytest.raises(SubjectDataError, match="differs from the folder name"):
        load_subject(folder)
    (folder / "subject.yaml").write_text("name: dog\nclass_word: dog\nextra: 1\n")
    with pytest.raises(SubjectDataError, match="extra"):
        load_subject(folder)
    (folder / "subject.yaml").write_text("name: dog\nclass_word: dog\n")
    (folder / "img0.jpg").write_bytes(b"")
    with pytest.raises(SubjectDataError, match=r"img0\.jpg: empty file"):
        load_subject(folder)


def test_a_photo_already_stored_for_another_subject_is_refused(tmp_path):
    """Validation requires each stored image to be unique across subjects: ingestion refuses what it would fail."""
    photos = _good_folder(tmp_path / "photos")
    _ingest(photos, tmp_path, name="dog_a")
    with pytest.raises(IngestError) as info:
        _ingest(photos, tmp_path, name="dog_b")
    assert len(info.value.problems) == 3
    assert all("already stored as" in p and "(subject 'dog_a')" in p for p in info.value.problems)
    assert sorted(p.name for p in (tmp_path / "data" / "subjects").iterdir()) == ["dog_a"]
    _ingest(photos, tmp_path, name="dog_a", force=True)  # replacing the same subject is not a clash


def test_written_folders_are_readable_by_others(tmp_path):
    """The subject folder (and augmentation output) is renamed from a temporary folder, which mkdtemp creates 0700:
    a trainer or reviewer running as another user could not read it."""
    from customcrafter.data.augment import materialise_examples

    previous = os.umask(0o022)
    try:
        subject = _ingest(_good_folder(tmp_path / "photos"), tmp_path).subject_dir
        out = materialise_examples(subject, tmp_path / "aug", num_examples=1)
        assert stat.S_IMODE(subject.stat().st_mode) == stat.S_IMODE(out.stat().st_mode) == 0o755
        assert {stat.S_IMODE(f.stat().st_mode) for f in subject.iterdir()} == {0o644}
        os.umask(0o077)  # a user who keeps their files private gets private outputs, as mkdir would give
        private = materialise_examples(subject, tmp_path / "private", num_examples=1)
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
    finally:
        os.umask(previous)


def test_the_same_picture_in_two_files_is_a_duplicate(tmp_path):
    """Different bytes (a JPEG and a PNG of its pixels), same picture: the stored JPEGs would be identical, which
    validation (unique sha256) rejects, so ingestion refuses it."""
    photos = _good_folder(tmp_path / "photos")
    with Image.open(photos / "img0.jpg") as image:
        image.save(photos / "copy.png")
    _assert_rejected(photos, tmp_path, "img0.jpg", "duplicate of copy.png (the same picture once stored)")


def test_a_photo_downscaled_below_the_minimum_side_is_refused(tmp_path):
    """--max-side 512 on 1200x400 photos would store 512x171 images, which validation (min side 256) rejects."""
    folder = tmp_path / "wide"
    folder.mkdir()
    for i in range(3):
        _photo(folder / f"{i}.jpg", size=(1200, 400), seed=i)
    _assert_rejected(folder, tmp_path, "0.jpg", "512x171 once downscaled to max side 512, below min side 256",
                     limits=ImageLimits(max_side=512))


def test_subject_option_is_a_folder_or_a_name_in_train_and_validate(tmp_path, monkeypatch, capsys):
    """`--subject` means the same in `train` and `data validate`: an existing folder, else a name under --data-root."""
    from types import SimpleNamespace

    import customcrafter.training.trainer as trainer
    from customcrafter.data.subjects import find_subject_dir

    data = tmp_path / "data"
    stored = _ingest(_good_folder(tmp_path / "photos"), tmp_path).subject_dir
    monkeypatch.chdir(tmp_path)
    assert find_subject_dir("pet", data) == data / "subjects" / "pet"
    assert find_subject_dir(str(stored), "elsewhere") == stored
    assert find_subject_dir("photos", data) == Path("photos")  # an existing folder wins over a name
    with pytest.raises(SubjectDataError, match=r"--subject 'ghost': neither a folder nor a subject under .*"
                                               r"tried folder ghost, subject .*subjects/ghost; subjects there: pet"):
        find_subject_dir("ghost", data)
    with pytest.raises(SubjectDataError, match=r"'a/b'.*tried folder a/b; not a subject name"):
        find_subject_dir("a/b", data)

    trained = []
    monkeypatch.setattr(trainer, "train", lambda config: trained.append(config) or SimpleNamespace(
        losses=[], module_dir=tmp_path / "module", steps=0, seconds=0.0))
    for value in ("pet", str(stored)):
        assert run_cli(["train", "--subject", value, "--data-root", str(data), "--output", str(tmp_path / "m")]) == 0
    assert [Path(c.subject_dir) for c in trained] == [data / "subjects" / "pet", stored]
    assert run_cli(["train", "--subject", "ghost", "--data-root", str(data)]) == 2 and not trained[2:]
    assert "--subject 'ghost': neither a folder nor a subject" in capsys.readouterr().err

    for value in ("pet", str(stored)):
        assert run_cli(["data", "validate", "--data-root", str(data), "--subject", value, "--out", "out"]) == 0
        assert "1 subjects, 3 images" in capsys.readouterr().out
    assert run_cli(["data", "validate", "--data-root", str(data), "--subject", "ghost", "--out", "out"]) == 2
    assert "--subject 'ghost': neither a folder nor a subject" in capsys.readouterr().err
