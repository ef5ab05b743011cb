"""End-to-end evaluation on tiny random CLIP/DINO models and small synthetic videos: tables, report, cache, CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import customcrafter
from customcrafter.evaluation.config import METRIC_NAMES, EvalConfig
from customcrafter.evaluation.protocol import CACHE_NAME, comparability, evaluate, read_manifest, summarize

FRAMES, SIZE = 8, 64


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[str, str]:
    """Tiny random CLIP (+ the packaged CLIP tokenizer) and DINO ViT, saved as local folders."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("models")
    tokenizer_dir = root / "tokenizer"
    shutil.copytree(Path(customcrafter.__file__).parent / "models" / "tokenizer", tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    clip_config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            **tiny,
        ),
        vision_config=dict(image_size=32, patch_size=8, **tiny),
        projection_dim=16,
    )
    clip_dir, dino_dir = root / "clip", root / "dino"
    CLIPModel(clip_config).save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    ViTModel(ViTConfig(image_size=32, patch_size=8, **tiny), add_pooling_layer=False).save_pretrained(
        dino_dir
    )
    return str(clip_dir), str(dino_dir)


def _config(tiny_models, **fields) -> EvalConfig:
    clip_dir, dino_dir = tiny_models
    return EvalConfig(clip_model=clip_dir, dino_model=dino_dir, device="cpu", batch_size=4, **fields)


def _blocks_image(seed: int) -> np.ndarray:
    """A few flat colour blocks: few colours, so a GIF stores it losslessly."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.kron(colours, np.ones((SIZE // 4, SIZE // 4, 1), dtype=np.uint8))


def _moving_video(seed: int, shift: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    wide = cv2.GaussianBlur(rng.random((SIZE, SIZE * 3)).astype(np.float32), (0, 0), 2.0)
    wide = ((wide - wide.min()) / (wide.max() - wide.min()) * 255).astype(np.uint8)
    start = shift * FRAMES + 8
    return np.stack(
        [
            np.repeat(wide[:, start - i * shift : start - i * shift + SIZE, None], 3, axis=-1)
            for i in range(FRAMES)
        ]
    )


def _write_subject(root: Path, name: str, seed: int, num_images: int = 2) -> Path:
    folder = root / "subjects" / name
    folder.mkdir(parents=True)
    for i in range(num_images):
        Image.fromarray(_blocks_image(seed * 10 + i)).save(folder / f"{i:02d}.png")
    (folder / "subject.yaml").write_text(f"name: {name}\nclass_word: dog\ntoken: <new1>\nkind: live\n")
    (folder / ".DS_Store").write_bytes(b"junk")  # hidden files are not reference images
    return folder


def _write_method(root: Path, method: str, subjects: dict[str, Path], video_fn, ext: str) -> Path:
    out = root / method
    rows = []
    for subject, subject_dir in subjects.items():
        for index, (template, ptype) in enumerate(
            [("{subject} is running.", "motion"), ("{subject} is sleeping.", "static")]
        ):
            relative = f"{subject}/p{index:02d}_s0.{ext}"
            (out / subject).mkdir(parents=True, exist_ok=True)
            frames = video_fn(subject, index)
            if ext == "gif":
                iio.imwrite(out / relative, frames, duration=125, loop=0)
            else:
                iio.imwrite(out / relative, frames, fps=8, codec="libx264", macro_block_size=1)
            rows.append(
                {
                    "method": method,
                    "subject": subject,
                    "subject_dir": str(subject_dir),
                    "class_word": "dog",
                    "token": "<new1>",
                    "kind": "live",
                    "prompt": template.replace("{subject}", "<new1> dog"),
                    "prompt_template": template,
                    "prompt_type": ptype,
                    "prompt_index": index,
                    "seed": 0,
                    "video": relative,
                    "sampling": {"num_inference_steps": 50, "guidance_scale": 12.0},
                }
            )
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture
def method_dirs(tmp_path) -> list[Path]:
    subjects = {name: _write_subject(tmp_path, name, seed) for seed, name in enumerate(["dog_a", "dog_b"])}
    moving = _write_method(
        tmp_path, "customcrafter", subjects, lambda s, i: _moving_video(len(s) + i, 2), "mp4"
    )
    still = _write_method(
        tmp_path, "base", subjects, lambda s, i: np.repeat(_blocks_image(7 + i)[None], FRAMES, axis=0), "gif"
    )
    return [moving, still]


def test_settings_recorded_with_different_types_still_write_every_table(tiny_models, method_dirs, tmp_path):
    """A foreign manifest that writes a setting as text ("50") beside ours (50) must not crash the last write."""
    manifest = method_dirs[1] / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row["sampling"]["num_inference_steps"] = "50"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate(method_dirs, tmp_path / "eval", _config(tiny_models))
    table = pd.read_parquet(result.per_video_parquet)
    assert set(table["sampling_num_inference_steps"]) == {"50"} and len(table) == 8
    assert any("num_inference_steps" in line for line in result.warnings)  # recorded differently: flagged

def test_the_registered_module_a_method_was_sampled_with_reaches_the_tables_and_reports(tiny_models, method_dirs,
                                                                                           tmp_path):
    """sample-eval-set records the registered model version (models:/...) in its manifest; the evaluation showed
    nowhere which version its numbers belong to."""
    manifest = method_dirs[0] / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row["subject_module"] = {"uri": "models:/customcrafter-dog@champion", "name": "customcrafter-dog",
                                 "version": 3, "alias": "champion", "run_id": "0123456789abcdef0123"}
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate(method_dirs, tmp_path / "eval", _config(tiny_models))

    label = "models:/customcrafter-dog/3 (run 0123456789ab)"
    table = pd.read_parquet(result.per_video_parquet)
    assert set(table.loc[table["method"] == "customcrafter", "subject_module"]) == {label}
    assert set(table.loc[table["method"] == "base", "subject_module"]) == {""}
    assert f"Registered subject modules: customcrafter: {label}" in (tmp_path / "eval" / "summary.md").read_text()
    report = (tmp_path / "eval" / "report.html").read_text()
    assert f"<td>customcrafter</td><td>{label}</td>" in report and "<td>base</td><td>not recorded</td>" in report
    assert result.warnings == []  # which version a method used is what it is compared on, not a difference


def test_evaluate_writes_tables_report_and_metrics(tiny_models, method_dirs, tmp_path):
    result = evaluate(method_dirs, tmp_path / "eval", _config(tiny_models))

    per_video = pd.read_csv(result.per_video_csv)
    assert len(per_video) == 8 and result.num_videos == 8 and result.num_computed == 8
    assert pd.read_parquet(result.per_video_parquet).shape == per_video.shape
    assert set(METRIC_NAMES) <= set(per_video.columns)
    assert (per_video["sampling_guidance_scale"] == 12.0).all()  # sampling settings recorded per video
    assert (per_video["clip_text"] == per_video["prompt"].str.replace("<new1> ", "")).all()
    assert per_video[list(METRIC_NAMES)].notna().all().all()
    assert (
        per_video["clip_i"].between(-1, 1).all()
        and per_video["temporal_consistency"].between(-1, 1.0001).all()
    )

    assert set(result.metrics) == {"customcrafter", "base"}
    assert all(set(values) == set(METRIC_NAMES) for values in result.metrics.values())
    moving, still = result.metrics["customcrafter"], result.metrics["base"]
    assert moving["motion"] == pytest.approx(2.0, rel=0.15) and still["motion"] < 0.05
    assert moving["dynamic_degree"] == 1.0 and still["dynamic_degree"] == 0.0
    assert still["temporal_consistency"] == pytest.approx(1.0, abs=1e-5)

    summary = pd.read_csv(result.summary_csv)
    assert set(summary["prompt_type"]) == {"all", "motion", "static"}
    overall = summary[(summary["prompt_type"] == "all")]
    assert (overall["n_subjects"] == 2).all() and (overall["n_videos"] == 4).all()
    assert (overall["ci_low"] <= overall["mean"] + 1e-9).all() and (
        overall["mean"] <= overall["ci_high"] + 1e-9
    ).all()

    report = result.report_html.read_text()
    assert report.count("data:image/gif;base64,") == 8  # every (subject, prompt, method) cell plays inline
    assert "data:image/png;base64," in report and "paper's Table 1" in report
    assert "src='http" not in report and 'src="http' not in report and "<link" not in report
    markdown = result.summary_md.read_text()
    assert "| customcrafter |" in markdown and "CLIP-T" in markdown and "Dynamic degree" in markdown
    assert result.warnings == [] and "Not like for like" not in markdown + report  # same videos, same settings
    assert json.loads((tmp_path / "eval" / "eval_config.json").read_text())["clip_model"] == tiny_models[0]


def test_rerun_computes_nothing_new_and_changed_video_is_rescored(
    tiny_models, method_dirs, tmp_path, monkeypatch
):
    out = tmp_path / "eval"
    first = evaluate(method_dirs, out, _config(tiny_models))
    assert first.num_computed == 8

    import customcrafter.evaluation.features as features

    def refuse(*args, **kwargs):
        raise AssertionError("a fully cached rerun must not load the feature models")

    monkeypatch.setattr(features.CLIPFeatures, "__init__", refuse)
    second = evaluate(method_dirs, out, _config(tiny_models))
    assert second.num_computed == 0
    assert second.metrics == first.metrics
    monkeypatch.undo()

    # a regenerated video is rescored (the key holds its sha256); so is everything under a changed metric config
    video = method_dirs[1] / "dog_a" / "p00_s0.gif"
    iio.imwrite(video, np.repeat(_blocks_image(99)[None], FRAMES, axis=0), duration=125, loop=0)
    assert evaluate(method_dirs, out, _config(tiny_models)).num_computed == 1
    assert evaluate(method_dirs, out, _config(tiny_models, token_handling="keep")).num_computed == 8
    # a truncated last cache line (killed mid-write) is ignored, not fatal
    with open(out / CACHE_NAME, "a") as fh:
        fh.write('{"key": "abc", "clip')
    assert evaluate(method_dirs, out, _config(tiny_models)).num_computed == 0


def test_video_of_the_reference_image_scores_one(tiny_models, tmp_path):
    subject_dir = _write_subject(tmp_path, "solo", seed=3, num_images=1)
    reference = np.asarray(Image.open(subject_dir / "00.png").convert("RGB"))
    method = _write_method(
        tmp_path,
        "copy",
        {"solo": subject_dir},
        lambda s, i: np.repeat(reference[None], FRAMES, axis=0),
        "gif",
    )
    result = evaluate([method], tmp_path / "eval", _config(tiny_models))
    metrics = result.metrics["copy"]
    assert metrics["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["dino_i"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["temporal_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["motion"] == pytest.approx(0.0, abs=1e-3)
    # one subject: the interval across subjects is undefined (NaN), the mean is still there
    summary = pd.read_csv(result.summary_csv)
    assert summary["ci_low"].isna().all() and summary["mean"].notna().all()


def test_reference_images_are_read_as_training_reads_them(tiny_models, tmp_path):
    """EXIF rotation applied, transparency flattened on white, TIFF listed: a video of the subject as training saw
    it scores CLIP-I = DINO-I = 1."""
    upright = _blocks_image(40)
    rotated = Image.fromarray(np.ascontiguousarray(np.rot90(upright)))  # stored on its side, EXIF 6 turns it back
    exif = rotated.getexif()
    exif[0x0112] = 6
    transparent = np.dstack([upright, np.full(upright.shape[:2], 255, np.uint8)])
    transparent[: SIZE // 4, :, 3] = 0  # training composites this band on white
    as_trained = upright.copy()
    as_trained[: SIZE // 4] = 255
    writers = {
        "exif": (lambda folder: rotated.save(folder / "00.png", exif=exif), upright),
        "alpha": (lambda folder: Image.fromarray(transparent, "RGBA").save(folder / "00.png"), as_trained),
        "tiff": (lambda folder: Image.fromarray(upright).save(folder / "00.tif"), upright),
    }
    subjects, videos = {}, {}
    for name, (write, frame) in writers.items():
        subjects[name] = _write_subject(tmp_path, name, seed=4, num_images=0)
        write(subjects[name])
        videos[name] = frame
    method = _write_method(tmp_path, "copy", subjects, lambda s, i: np.repeat(videos[s][None], FRAMES, axis=0), "gif")
    per_video = pd.read_csv(evaluate([method], tmp_path / "eval", _config(tiny_models)).per_video_csv)
    assert sorted(per_video["subject"].unique()) == ["alpha", "exif", "tiff"]
    assert per_video["clip_i"].to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert per_video["dino_i"].to_numpy() == pytest.approx(1.0, abs=1e-5)


def test_methods_compared_on_other_videos_or_settings_are_flagged():
    from customcrafter.evaluation.report import render_markdown_summary

    def video(method, subject, prompt, guidance=12.0, dwvss=None):
        return {"method": method, "subject": subject, "prompt_index": prompt, "seed": 0, "prompt_type": "motion",
                **{k: 0.5 for k in METRIC_NAMES},
                "sampling": json.dumps({"guidance_scale": guidance, "dwvss": dwvss, "num_inference_steps": 50})}

    same = pd.DataFrame([video(m, s, p, dwvss={"k": 5} if m == "customcrafter" else None)
                         for m in ("customcrafter", "custom_diffusion") for s in ("a", "b") for p in (0, 1)])
    assert comparability(same) == []  # DWVSS is CustomCrafter's own: not a difference
    other = pd.DataFrame([video("customcrafter", s, p) for s in ("a", "b") for p in (0, 1)]
                         + [video("custom_diffusion", "a", p, guidance=9.0) for p in (0, 1)])
    lines = comparability(other)
    assert len(lines) == 2, lines
    assert lines[0].startswith("method 'custom_diffusion' lacks 2 of the 4 (subject, prompt, seed) videos") \
        and "subjects: b" in lines[0]
    assert lines[1].startswith("sampling setting 'guidance_scale' differs between methods") and "9.0" in lines[1]
    summary = summarize(other, 0.95)
    markdown = render_markdown_summary(summary, other, EvalConfig(), lines)
    assert markdown.count("**Not like for like:**") == 2


def test_methods_sampled_at_another_dtype_or_an_unrecorded_one_are_flagged():
    def videos(method, **dtype):
        return [{"method": method, "subject": "a", "prompt_index": p, "seed": 0, "prompt_type": "motion",
                 **{k: 0.5 for k in METRIC_NAMES}, "sampling": json.dumps({"num_inference_steps": 50, **dtype})}
                for p in (0, 1)]

    assert comparability(pd.DataFrame(videos("customcrafter", dtype="bf16") + videos("base", dtype="bf16"))) == []
    assert comparability(pd.DataFrame(videos("customcrafter") + videos("base"))) == []  # both older manifests
    assert comparability(pd.DataFrame(videos("customcrafter", dtype="bf16") + videos("base", dtype="fp32"))) == [
        """sampling setting 'dtype' differs between methods (customcrafter: "bf16"; base: "fp32")"""]
    # an older manifest (no dtype) beside a new one: unknown, not taken as the same, and named as such
    assert comparability(pd.DataFrame(videos("customcrafter", dtype="bf16") + videos("base"))) == [
        """sampling setting 'dtype' differs between methods (customcrafter: "bf16"; base: unknown (not in its """
        """manifest))"""]


def test_methods_prompted_differently_or_scored_against_other_references_are_flagged(tiny_models, method_dirs,
                                                                                       tmp_path):
    result = evaluate(method_dirs, tmp_path / "eval", _config(tiny_models))
    assert result.warnings == []  # the module's "<new1> dog ..." and the base's "dog ..." are the same prompts
    manifest = method_dirs[1] / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    copy = shutil.copytree(rows[0]["subject_dir"], tmp_path / "elsewhere" / "dog_a")
    for row in rows:
        if row["subject"] == "dog_a":
            row["subject_dir"] = str(copy)
        if row["prompt_index"] == 1:  # e.g. sampled with the other kind's prompts
            row["prompt_template"] = "{subject} rotating slowly on a turntable."
            row["prompt"] = "<new1> dog rotating slowly on a turntable."
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    lines = evaluate(method_dirs, tmp_path / "eval", _config(tiny_models)).warnings
    assert len(lines) == 3, lines
    assert lines[0].startswith("subject 'dog_a' is scored against other reference images per method") \
        and str(copy) in lines[0]
    assert lines[1].startswith("subject 'dog_a': prompt_index 1 names other prompts per method") \
        and "'dog is sleeping.'" in lines[1] and "'dog rotating slowly on a turntable.'" in lines[1]
    assert lines[2].startswith("subject 'dog_b': prompt_index 1 names other prompts per method")


def test_summary_averages_subjects_first_then_t_interval():
    rows = [
        ("m", "a", "motion", 1.0),
        ("m", "a", "motion", 1.0),
        ("m", "a", "static", 1.0),  # subject a: 3 videos
        ("m", "b", "motion", 0.0),
        ("m", "c", "static", 0.5),
    ]
    per_video = pd.DataFrame(
        [{"method": m, "subject": s, "prompt_type": t, **{k: v for k in METRIC_NAMES}} for m, s, t, v in rows]
    )
    summary = summarize(per_video, 0.95)
    overall = summary[(summary["prompt_type"] == "all") & (summary["metric"] == "clip_t")].iloc[0]
    assert overall["mean"] == pytest.approx(0.5)  # (1 + 0 + 0.5) / 3, not the per-video mean 0.7
    half = 4.302652729911275 * 0.5 / math.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n)
    assert overall["ci_low"] == pytest.approx(0.5 - half) and overall["ci_high"] == pytest.approx(0.5 + half)
    assert overall["n_subjects"] == 3 and overall["n_videos"] == 5
    motion = summary[(summary["prompt_type"] == "motion") & (summary["metric"] == "clip_t")].iloc[0]
    assert motion["mean"] == pytest.approx(0.5) and motion["n_subjects"] == 2


def test_cli_evaluate(tiny_models, method_dirs, tmp_path, capsys):
    from customcrafter.cli import main

    out = tmp_path / "cli_eval"
    main(
        [
            "evaluate",
            "--method-outputs",
            str(method_dirs[0]),
            str(method_dirs[1]),
            "--out",
            str(out),
            "--clip-model",
            tiny_models[0],
            "--dino-model",
            tiny_models[1],
            "--device",
            "cpu",
            "--set",
            "batch_size=8",
        ]
    )
    for name in ("per_video.csv", "per_video.parquet", "summary.csv", "report.html", "summary.md"):
        assert (out / name).is_file(), name
    assert len(pd.read_csv(out / "per_video.csv")) == 8
    assert "| base |" in capsys.readouterr().out


def test_cli_missing_manifest_is_one_line_error(tmp_path, capsys):
    from customcrafter.cli import main

    empty = tmp_path / "no_manifest"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--method-outputs", str(empty), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(empty / "manifest.jsonl") in err and "not found" in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_out_under_a_file_is_one_line_error(tmp_path, capsys):
    from customcrafter.cli import main

    folder, a_file = tmp_path / "no_manifest", tmp_path / "file"
    folder.mkdir()
    a_file.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--method-outputs", str(folder), "--out", str(a_file / "eval")])
    assert exit_info.value.code == 2
    assert f"error: --out {a_file / 'eval'}: {a_file} is a file, not a folder" in capsys.readouterr().err


def test_missing_video_and_bad_rows_are_named_before_any_work(tiny_models, method_dirs, tmp_path):
    (method_dirs[1] / "dog_b" / "p01_s0.gif").unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest.jsonl:4: video 'dog_b/p01_s0.gif' not found"):
        evaluate(method_dirs, tmp_path / "eval", _config(tiny_models))
    assert not (tmp_path / "eval").exists()

    manifest = method_dirs[0] / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    del rows[1]["seed"]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"manifest.jsonl:2: missing field 'seed'"):
        read_manifest(method_dirs[0])
    rows[1]["seed"], rows[2]["prompt_type"] = 0, "dance"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"manifest.jsonl:3: prompt_type must be"):
        read_manifest(method_dirs[0])


def test_same_method_name_twice_is_an_error(tiny_models, method_dirs, tmp_path):
    with pytest.raises(ValueError, match="appears twice"):
        evaluate([method_dirs[0], method_dirs[0]], tmp_path / "eval", _config(tiny_models))


def test_unloadable_model_names_it(method_dirs, tmp_path):
    config = EvalConfig(clip_model=str(tmp_path / "nowhere"), device="cpu")
    with pytest.raises(ValueError, match="CLIP model .*nowhere"):
        evaluate(method_dirs, tmp_path / "eval", config)


@pytest.mark.parametrize("fps, frozen, total", [(8, 13, 16), (16, 15, 16), (8, 1, 16), (12, 5, 16)])
def test_gif_frames_merged_by_the_writer_are_restored(tmp_path, fps, frozen, total):
    """A video frozen for its first frames, written as GIF: the writer merges them into one frame of a longer
    duration (stored in centiseconds). Reading restores the written count, with and without the manifest's count."""
    from customcrafter.evaluation.videos import read_video_frames

    frames = np.stack([_blocks_image(0)] * frozen + [_blocks_image(i + 1) for i in range(total - frozen)])
    path = tmp_path / "clip.gif"
    iio.imwrite(path, frames, duration=1000 / fps, loop=0)
    assert Image.open(path).n_frames == total - frozen + 1  # merged on disk
    for written in (None, total):
        read = read_video_frames(path, num_frames=written)
        assert read.shape[0] == total
        np.testing.assert_array_equal(read, frames)


def test_gif_frame_count_from_the_manifest_is_exact_where_durations_are_not(tmp_path):
    """27 merged frames at 8 fps are stored as 3370 ms against 120 ms for one: 28 by durations alone."""
    from customcrafter.evaluation.videos import read_video_frames

    frames = np.stack([_blocks_image(0)] * 27 + [_blocks_image(1), _blocks_image(2), _blocks_image(3)])
    path = tmp_path / "long.gif"
    iio.imwrite(path, frames, duration=125, loop=0)
    assert read_video_frames(path).shape[0] == 31
    np.testing.assert_array_equal(read_video_frames(path, num_frames=30), frames)
    with pytest.raises(ValueError, match=r"long.gif.*holds 4 frames, more than the 3 it was written with"):
        read_video_frames(path, num_frames=3)


def test_gif_videos_are_scored_at_the_manifests_frame_count(tiny_models, tmp_path):
    subjects = {"dog_a": _write_subject(tmp_path, "dog_a", 0)}
    frozen_then_moving = np.concatenate([np.repeat(_blocks_image(5)[None], 5, axis=0), _moving_video(1, 2)[:3]])
    method = _write_method(tmp_path, "gif", subjects, lambda s, i: frozen_then_moving, "gif")
    manifest = method / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row["sampling"]["num_frames"] = FRAMES
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate([method], tmp_path / "eval", _config(tiny_models))
    assert (pd.read_csv(result.per_video_csv)["num_frames"] == FRAMES).all()

    rows[0]["sampling"]["num_frames"] = 0
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"manifest.jsonl:1: field 'sampling.num_frames' must be a positive integer"):
        read_manifest(method)


def test_a_subject_folder_without_images_is_named_before_any_work(tiny_models, method_dirs, tmp_path):
    for image in (method_dirs[0].parent / "subjects" / "dog_b").glob("*.png"):
        image.unlink()
    with pytest.raises(ValueError, match=r"customcrafter/manifest.jsonl:3: subject_dir '.*dog_b'.*no reference images"):
        evaluate(method_dirs, tmp_path / "eval", _config(tiny_models))
    assert not (tmp_path / "eval").exists()


def test_a_subject_dir_under_home_reaches_the_report(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_subject(tmp_path, "dog_a", 0)
    method = _write_method(tmp_path, "base", {"dog_a": Path("~/subjects/dog_a")},
                           lambda s, i: _moving_video(i, 2), "mp4")
    result = evaluate([method], tmp_path / "eval", _config(tiny_models))
    assert result.report_html.is_file()
    assert pd.read_csv(result.per_video_csv)["subject_dir"].iloc[0] == str(tmp_path / "subjects" / "dog_a")


def test_cli_sample_eval_set_folders_are_scored_by_evaluate(tiny_models, tmp_path, capsys):
    """`customcrafter sample-eval-set` for a module and for --base (tiny models), then `customcrafter evaluate`."""
    from customcrafter.cli import main
    from customcrafter.training.config import TrainConfig
    from customcrafter.training.trainer import train

    subject = _write_subject(tmp_path, "dog_a", 0)
    module = train(TrainConfig(base_model="tiny", subject_dir=str(subject), output_dir=str(tmp_path / "run"),
                               resolution=(64, 96), num_frames=2, steps=1, prior_preservation=False,
                               checkpoint_every=None)).module_dir
    small = ["--base-model", "tiny", "--subject", str(subject), "--prompt-limit", "2", "--seed", "3", "--steps", "2",
             "--set", "num_frames=2", "--set", "height=64", "--set", "width=96", "--device", "cpu"]
    main(["sample-eval-set", "--subject-module", str(module), "--out", str(tmp_path / "cc"), *small])
    main(["sample-eval-set", "--base", "--out", str(tmp_path / "base"), *small])
    assert "wrote 2 videos of dog_a (base)" in capsys.readouterr().out

    main(["evaluate", "--method-outputs", str(tmp_path / "cc"), str(tmp_path / "base"), "--out", str(tmp_path / "ev"),
          "--clip-model", tiny_models[0], "--dino-model", tiny_models[1], "--device", "cpu"])
    summary = capsys.readouterr().out
    assert "| customcrafter |" in summary and "| base |" in summary
    assert "Not like for like" not in summary  # same prompts, seeds and settings (the base at the modules' fps 16)
    per_video = pd.read_csv(tmp_path / "ev" / "per_video.csv")
    assert sorted(zip(per_video["method"], per_video["prompt_index"], per_video["seed"], strict=True)) == [
        ("base", 0, 3), ("base", 1, 3), ("customcrafter", 0, 3), ("customcrafter", 1, 3)]
    assert (per_video["sampling_fps"] == 16).all() and (per_video["num_frames"] == 2).all()
    assert (per_video["sampling_dtype"] == "fp32").all()  # what ran: the CPU runs fp32 whatever --dtype asks (bf16)
    assert per_video[list(METRIC_NAMES)].notna().all().all()
