"""Instance augmentation: seeded, zoom-out mask matches the pasted content, prefixes, factor distribution."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from customcrafter.config import ConfigError, load_config
from customcrafter.data.augment import (
    AugmentConfig,
    augment_instance,
    materialise_examples,
    prepare_class_image,
)


def _bright_image(width=600, height=400, seed=0) -> Image.Image:
    """Random bright pixels (>= 64 everywhere), so black canvas is distinguishable from content."""
    array = np.random.default_rng(seed).integers(64, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(array)


def _find_seed_with_zoom(config, predicate, image):
    for seed in range(500):
        example = augment_instance(image, random.Random(seed), config)
        if predicate(example.zoom):
            return seed, example
    raise AssertionError("no seed gave the wanted zoom")


def test_same_seed_same_example_and_shapes():
    image = _bright_image()
    config = AugmentConfig()
    for seed in range(6):
        a = augment_instance(image, random.Random(seed), config)
        b = augment_instance(image, random.Random(seed), config)
        assert torch.equal(a.pixels, b.pixels) and torch.equal(a.mask, b.mask)
        assert (a.prefix, a.zoom) == (b.prefix, b.zoom)
        assert a.pixels.shape == (3, 320, 512) and a.pixels.dtype == torch.float32
        assert a.mask.shape == (40, 64)
        assert a.pixels.min() >= -1 and a.pixels.max() <= 1
        assert set(a.mask.unique().tolist()) <= {0.0, 1.0}
    different = {augment_instance(image, random.Random(s), config).pixels.sum().item() for s in range(6)}
    assert len(different) > 1


def test_zoom_out_mask_matches_pasted_box():
    image = _bright_image()
    config = AugmentConfig(flip_p=0.0)
    for wanted in config.zoom_out_factors:
        _, example = _find_seed_with_zoom(config, lambda z, w=wanted: z == w, image)
        assert example.prefix in config.zoom_out_prefixes
        content = (example.pixels > -0.99).any(dim=0)  # black canvas is exactly -1
        rows, cols = torch.nonzero(content, as_tuple=True)
        top, bottom, left, right = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
        assert bottom - top == round(320 * wanted) and right - left == round(512 * wanted)
        assert content[top:bottom, left:right].all()  # one solid pasted box
        # The mask is exactly the latent cells lying wholly inside the box.
        expected = torch.zeros(40, 64)
        for r in range(40):
            for c in range(64):
                if r * 8 >= top and (r + 1) * 8 <= bottom and c * 8 >= left and (c + 1) * 8 <= right:
                    expected[r, c] = 1
        assert torch.equal(example.mask, expected)
        assert example.mask.sum() > 0


def test_zoom_in_and_keep():
    image = _bright_image()
    config = AugmentConfig(flip_p=0.0)
    _, zoom_in = _find_seed_with_zoom(config, lambda z: z > 1, image)
    assert zoom_in.prefix in ("zoomed in ", "close up ")
    assert zoom_in.mask.all()
    assert (zoom_in.pixels > -0.99).all()  # a crop: no canvas
    _, keep = _find_seed_with_zoom(config, lambda z: 0.6 <= z <= 1.0, image)
    assert keep.prefix == "" and keep.mask.all()
    # Unchanged: equal to the plain crop+resize, which is what the disabled augmentation gives.
    plain = augment_instance(image, random.Random(0), AugmentConfig(flip_p=0.0, enabled=False))
    assert plain.zoom == 1.0 and plain.prefix == ""
    assert torch.equal(keep.pixels, plain.pixels)


def test_factor_distribution_and_prefixes():
    image = _bright_image(160, 100)
    config = AugmentConfig(resolution=(40, 64))
    rng = random.Random(123)
    examples = [augment_instance(image, rng, config) for _ in range(3000)]
    zooms = Counter(e.zoom for e in examples)
    assert set(zooms) == {0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.3, 1.4}
    zoom_in_share = sum(n for z, n in zooms.items() if z > 1) / len(examples)
    assert abs(zoom_in_share - 1 / 3) < 0.03
    prefixes = Counter(e.prefix for e in examples if e.zoom < 0.6)
    assert set(prefixes) == {"a far away ", "very small "}
    assert {e.prefix for e in examples if e.zoom > 1} == {"zoomed in ", "close up "}
    assert {e.prefix for e in examples if 0.6 <= e.zoom <= 1} == {""}
    flips = sum(1 for e in examples if e.zoom == 1.0)  # sanity: keep factors are used
    assert flips > 0


def test_paper_range_option_and_config_errors():
    assert AugmentConfig(zoom_range="paper").zoom_out_factors == (0.4, 0.5)
    assert AugmentConfig().zoom_out_factors == (0.3, 0.4, 0.5)
    rng = random.Random(0)
    zooms = {augment_instance(_bright_image(160, 100), rng, AugmentConfig(resolution=(40, 64), zoom_range="paper")).zoom
             for _ in range(400)}
    assert min(zooms) == 0.4
    with pytest.raises(ConfigError, match="resolution"):
        load_config(AugmentConfig, overrides=["resolution=[321, 512]"])
    with pytest.raises(ConfigError, match="zoom_in_factors"):
        load_config(AugmentConfig, overrides=["zoom_in_factors=[0.9]"])
    with pytest.raises(ConfigError, match="unknown_field|Extra inputs"):
        load_config(AugmentConfig, overrides=["unknown_field=1"])


def test_flip_is_horizontal():
    image = _bright_image()
    no_flip = augment_instance(image, random.Random(0), AugmentConfig(flip_p=0.0, enabled=False))
    flip = augment_instance(image, random.Random(0), AugmentConfig(flip_p=1.0, enabled=False))
    assert torch.allclose(flip.pixels, no_flip.pixels.flip(-1), atol=1e-6)


def test_prepare_class_image_squashes_without_crop():
    # Left half red, right half blue, 3:1 wide: a squash keeps both halves, a centre crop would not.
    array = np.zeros((100, 300, 3), dtype=np.uint8)
    array[:, :150] = (255, 0, 0)
    array[:, 150:] = (0, 0, 255)
    example = prepare_class_image(Image.fromarray(array), AugmentConfig())
    assert example.pixels.shape == (3, 320, 512) and example.mask.all() and example.prefix == ""
    assert example.pixels[0, :, :200].mean() > 0.9 and example.pixels[2, :, 312:].mean() > 0.9


def test_materialise_examples(tmp_path):
    subject = tmp_path / "toy"
    subject.mkdir()
    for i in range(3):
        _bright_image(seed=i).save(subject / f"{i:02d}.jpg", quality=95)
    (subject / "subject.yaml").write_text("name: toy\nclass_word: toy\nkind: object\n")
    out = materialise_examples(subject, tmp_path / "aug", num_examples=7, seed=5, config=AugmentConfig())
    records = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(records) == 7
    assert [r["source_image"] for r in records] == ["00.jpg", "01.jpg", "02.jpg", "00.jpg", "01.jpg", "02.jpg",
                                                    "00.jpg"]
    for record in records:
        assert record["prompt"] == f"{record['prompt_prefix']}<new1> toy"
        with Image.open(out / record["image"]) as im:
            assert im.size == (512, 320) and im.mode == "RGB"
        with Image.open(out / record["mask"]) as mask:
            assert mask.size == (64, 40)
    assert (out / "preview.png").is_file()
    # Deterministic: a second run with the same seed writes identical examples.
    again = materialise_examples(subject, tmp_path / "aug2", num_examples=7, seed=5)
    assert (again / "examples.jsonl").read_text() == (out / "examples.jsonl").read_text()
    assert (again / "images" / "0003.png").read_bytes() == (out / "images" / "0003.png").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    # the output folder is replaced whole: earlier examples may go, the subject or other files may not
    materialise_examples(subject, out, num_examples=2, seed=5)
    for wrong in (subject, tmp_path):  # the subject itself, or a folder holding it
        with pytest.raises(ValueError, match="holds the subject"):
            materialise_examples(subject, wrong, num_examples=2)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an examples folder"):
        materialise_examples(subject, tmp_path / "notes", num_examples=2)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine" and len(list(subject.glob("*.jpg"))) == 3


def test_examples_are_never_written_into_the_data_folder(tmp_path):
    """--out data/subjects/dog_aug made a folder without subject.yaml among the subjects: `data list` and validation
    then failed on it, and DVC saw the data modified. Inside the subject, the examples went into its versioned data."""
    data = tmp_path / "data"
    subject = data / "subjects" / "toy"
    subject.mkdir(parents=True)
    for i in range(3):
        _bright_image(seed=i).save(subject / f"{i:02d}.jpg", quality=95)
    (subject / "subject.yaml").write_text("name: toy\nclass_word: toy\nkind: object\n")
    for wrong in (data / "subjects" / "toy_aug", data / "aug", subject / "aug"):
        with pytest.raises(ValueError, match="inside the data folder"):
            materialise_examples(subject, wrong, num_examples=1)
        assert not wrong.exists()
    assert sorted(p.name for p in data.rglob("*")) == ["00.jpg", "01.jpg", "02.jpg", "subject.yaml", "subjects", "toy"]
    materialise_examples(subject, tmp_path / "outputs" / "aug", num_examples=1)


def _awkward_photos(folder) -> None:
    """What `data add` normalises: a JPEG stored sideways with EXIF Orientation 6 (a grey left half, black right
    half once upright), a 16-bit grey PNG, and an RGBA PNG whose pixels are transparent red."""
    folder.mkdir()
    upright = np.zeros((400, 640, 3), dtype=np.uint8)
    upright[:, :320] = 128
    sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # stored 400 wide, 640 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    sideways.save(folder / "00.jpg", quality=95, exif=exif)
    Image.fromarray(np.full((400, 640), 32768, dtype=np.uint16)).save(folder / "01.png")
    rgba = np.zeros((400, 640, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    Image.fromarray(rgba, "RGBA").save(folder / "02.png")
    (folder / "subject.yaml").write_text("name: photos\nclass_word: toy\nkind: object\n")


def test_augment_and_training_read_photos_as_ingestion_does(tmp_path):
    """EXIF rotation applied, 16-bit scaled (not clipped to white), transparency flattened on white - for the
    augment step and for training straight from a folder (`customcrafter train --subject DIR`)."""
    from customcrafter.training.config import TrainConfig
    from customcrafter.training.dataset import SubjectDataset, resolve_subject

    _awkward_photos(tmp_path / "photos")
    subject = resolve_subject(tmp_path / "photos")
    images = SubjectDataset(subject, TrainConfig(subject_dir="x", prior_preservation=False)).instance_images
    rotated, grey, flattened = (np.asarray(im) for im in images)
    assert rotated.shape == (400, 640, 3)  # upright: landscape
    assert abs(int(rotated[:, :300].mean()) - 128) <= 3 and rotated[:, 340:].max() <= 10  # grey left, black right
    assert grey.shape == (400, 640, 3) and abs(int(grey.mean()) - 128) <= 1  # 32768 / 65535, not 255
    assert flattened.min() == 255  # transparent red on white

    out = materialise_examples(tmp_path / "photos", tmp_path / "aug", num_examples=3, seed=0)
    records = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    grey_example = next(r for r in records if r["source_image"] == "01.png")
    with Image.open(out / grey_example["image"]) as im:
        assert np.asarray(im).max() <= 140  # mid-grey content (and black canvas), never the clipped white
