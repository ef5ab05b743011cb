"""The evaluation protocol: every video of every method's manifest, scored, cached, tabulated and aggregated.

``evaluate(method_dirs, out_dir, config)`` reads each ``DIR/manifest.jsonl`` (contract in docs/ARCHITECTURE.md),
scores every video (subjects × prompts × seeds) with the metrics of ``metrics.py`` and ``motion.py``, and writes:

- ``per_video.csv`` / ``per_video.parquet``: one tidy row per video, with its sampling settings;
- ``summary.csv``: per method × prompt type (all / motion / static) × metric, the mean and a t-interval across
  subjects (per-subject means first, so subjects weigh equally whatever their number of videos);
- ``report.html`` (self-contained) and ``summary.md``; ``eval_config.json`` (the resolved config).

Per-video metrics are appended to ``metric_cache.jsonl`` as they are computed, keyed by everything that changes
them (method, video path and sha256, prompt, reference images, model ids, metric config); a rerun — after a crash
or with more videos — only computes what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from customcrafter.config import save_config
from customcrafter.evaluation.config import METRIC_NAMES, EvalConfig
from customcrafter.evaluation.metrics import image_alignment, temporal_consistency, text_alignment
from customcrafter.evaluation.motion import motion_stats
from customcrafter.evaluation.prompts import format_prompt
from customcrafter.evaluation.videos import (
    file_sha256,
    load_rgb_image,
    read_video_frames,
    reference_image_paths,
)
from customcrafter.utils import atomic_write_bytes, pick_device

__all__ = ["EvalResult", "evaluate", "read_manifest", "clip_text", "summarize", "MANIFEST_NAME", "CACHE_NAME"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
CACHE_NAME = "metric_cache.jsonl"
REQUIRED_FIELDS = {
    "method": str,
    "subject": str,
    "subject_dir": str,
    "class_word": str,
    "token": str,
    "kind": str,
    "prompt": str,
    "prompt_type": str,
    "prompt_index": int,
    "seed": int,
    "video": str,
}
PROMPT_TYPES = ("all", "motion", "static")


@dataclass
class EvalResult:
    per_video_csv: Path
    per_video_parquet: Path
    summary_csv: Path
    report_html: Path
    summary_md: Path
    metrics: dict[str, dict[str, float]]  # method -> metric -> mean across subjects (all prompts)
    num_videos: int = 0
    num_computed: int = 0  # videos scored in this run (the rest came from the cache)
    summary: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    warnings: list[str] = field(default_factory=list)  # why methods' means may not be comparable (see comparability)


# ----------------------------------------------------------------------------------------------- manifests


def read_manifest(method_dir: str | Path) -> list[dict]:
    """Rows of ``DIR/manifest.jsonl``, validated; each gets ``video_path`` and ``subject_path`` (absolute)."""
    method_dir = Path(method_dir)
    path = method_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (is {method_dir} a sampling output folder?)")
    rows = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object")
        for name, kind in REQUIRED_FIELDS.items():
            if name not in row:
                raise ValueError(f"{where}: missing field {name!r}")
            if not isinstance(row[name], kind) or isinstance(row[name], bool):
                raise ValueError(f"{where}: field {name!r} must be {kind.__name__}, got {row[name]!r}")
        if row["prompt_type"] not in ("motion", "static"):
            raise ValueError(f"{where}: prompt_type must be 'motion' or 'static', got {row['prompt_type']!r}")
        video_path = (method_dir / row["video"]).resolve()
        if not video_path.is_file():
            raise FileNotFoundError(f"{where}: video {row['video']!r} not found at {video_path}")
        subject_path = Path(row["subject_dir"]).expanduser().resolve()
        if not subject_path.is_dir():
            raise FileNotFoundError(
                f"{where}: subject_dir {row['subject_dir']!r} not found "
                f"(relative paths are resolved from the current directory)"
            )
        try:
            reference_image_paths(subject_path)
        except ValueError as exc:
            raise ValueError(f"{where}: subject_dir {row['subject_dir']!r}: {exc}") from None
        row.setdefault("prompt_template", None)
        row.setdefault("sampling", {})
        if not isinstance(row["sampling"], dict):
            raise ValueError(f"{where}: field 'sampling' must be an object, got {row['sampling']!r}")
        written = row["sampling"].get("num_frames")
        if written is not None and (not isinstance(written, int) or isinstance(written, bool) or written < 1):
            raise ValueError(f"{where}: field 'sampling.num_frames' must be a positive integer, got {written!r}")
        row.update(video_path=video_path, subject_path=subject_path, method_dir=str(method_dir.resolve()))
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: manifest has no videos")
    return rows


def _read_all_manifests(method_dirs: list[Path]) -> list[dict]:
    if not method_dirs:
        raise ValueError("no method output folders given (--method-outputs DIR ...)")
    rows, seen = [], {}
    for method_dir in method_dirs:
        for row in read_manifest(method_dir):
            key = (row["method"], row["subject"], row["prompt_index"], row["seed"])
            if key in seen:
                raise ValueError(
                    f"method {row['method']!r}, subject {row['subject']!r}, prompt {row['prompt_index']}, "
                    f"seed {row['seed']} appears twice ({seen[key]} and {method_dir}); methods compared "
                    f"side by side need distinct names"
                )
            seen[key] = method_dir
            rows.append(row)
    return rows


def clip_text(row: dict, token_handling: str = "replace") -> str:
    """The text CLIP-T compares frames with (see ``EvalConfig.token_handling``)."""
    prompt, token, class_word = row["prompt"], row["token"], row["class_word"]
    if token_handling == "keep" or not token:
        return prompt
    if token_handling == "replace":
        if row.get("prompt_template"):
            return format_prompt(row["prompt_template"], "", class_word)
        prompt = prompt.replace(f"{token} {class_word}", class_word).replace(token, class_word)
    elif token_handling == "drop":
        prompt = prompt.replace(token, "")
    else:
        raise ValueError(f"token_handling must be 'replace', 'drop' or 'keep', got {token_handling!r}")
    return " ".join(prompt.split())


# ----------------------------------------------------------------------------------------------- scoring


def _cache_key(row: dict, video_sha: str, refs_sha: str, config: EvalConfig, text: str) -> str:
    identity = {
        "method": row["method"],
        "video": str(row["video_path"]),
        "video_sha256": video_sha,
        "text": text,
        "references_sha256": refs_sha,
        "references_reader": 2,  # read as training reads them (EXIF rotation, alpha on white): older scores are stale
        "clip_model": config.clip_model,
        "dino_model": config.dino_model,
        "config": config.metric_hash(),
    }
    if Path(row["video_path"]).suffix.lower() == ".gif":  # merged GIF frames are restored (videos._read_gif)
        identity["gif_frames"] = {"reader": 2, "num_frames": row["sampling"].get("num_frames")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _load_cache(path: Path) -> dict[str, dict]:
    cache = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:  # a run killed mid-write leaves at most one truncated last line: skip it
                record = json.loads(line)
                cache[record["key"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return cache


class _Scorer:
    """Loads the feature models on first use (a fully cached rerun loads nothing) and caches reference features."""

    def __init__(self, config: EvalConfig):
        self.config = config
        self._clip = self._dino = None
        self._references: dict[str, tuple] = {}

    def _models(self):
        if self._clip is None:
            from customcrafter.evaluation.features import CLIPFeatures, DINOFeatures

            device = pick_device(self.config.device)
            logger.info(
                "loading CLIP %s and DINO %s on %s", self.config.clip_model, self.config.dino_model, device
            )
            self._clip = CLIPFeatures(self.config.clip_model, device, self.config.batch_size)
            self._dino = DINOFeatures(
                self.config.dino_model, device, self.config.batch_size, self.config.dino_preprocess
            )
        return self._clip, self._dino

    def _reference_features(self, subject_path: Path):
        key = str(subject_path)
        if key not in self._references:
            clip, dino = self._models()
            images = [load_rgb_image(p) for p in reference_image_paths(subject_path)]
            self._references[key] = (clip.image_features(images), dino.image_features(images))
        return self._references[key]

    def score(self, row: dict, frames: np.ndarray, text: str) -> dict[str, float]:
        clip, dino = self._models()
        ref_clip, ref_dino = self._reference_features(row["subject_path"])
        frame_clip = clip.image_features(list(frames))
        frame_dino = dino.image_features(list(frames))
        motion = motion_stats(frames, self.config.flow)
        return {
            "clip_t": text_alignment(frame_clip, clip.text_features([text])[0]),
            "clip_i": image_alignment(frame_clip, ref_clip),
            "dino_i": image_alignment(frame_dino, ref_dino),
            "temporal_consistency": temporal_consistency(frame_clip),
            "motion": motion.motion,
            "dynamic_degree": motion.dynamic_degree,
        }


def _references_sha(subject_path: Path, memo: dict[str, str]) -> str:
    key = str(subject_path)
    if key not in memo:
        digest = hashlib.sha256()
        for path in reference_image_paths(subject_path):
            digest.update(path.name.encode() + file_sha256(path).encode())
        memo[key] = digest.hexdigest()
    return memo[key]


def _score_rows(rows: list[dict], cache_path: Path, config: EvalConfig) -> tuple[list[dict], int]:
    cache = _load_cache(cache_path)
    scorer, refs_memo, records, computed = _Scorer(config), {}, [], 0
    with open(cache_path, "a", encoding="utf-8") as cache_file:
        for row in tqdm(rows, desc="evaluate", unit="video"):
            text = clip_text(row, config.token_handling)
            video_sha = file_sha256(row["video_path"])
            key = _cache_key(row, video_sha, _references_sha(row["subject_path"], refs_memo), config, text)
            record = cache.get(key)
            if record is None:
                frames = read_video_frames(row["video_path"], config.max_frames, row["sampling"].get("num_frames"))
                record = {
                    "key": key,
                    **scorer.score(row, frames, text),
                    "num_frames": int(frames.shape[0]),
                    "height": int(frames.shape[1]),
                    "width": int(frames.shape[2]),
                }
                cache_file.write(json.dumps(record) + "\n")
                cache_file.flush()
                cache[key] = record
                computed += 1
            records.append(_tidy_row(row, record, text, video_sha))
    return records, computed


def module_label(origin: object) -> str:
    """A manifest row's ``subject_module`` (the registered model it was sampled with: name, version, run id) as
    ``models:/NAME/VERSION (run ID)``; empty where the manifest records none (a module folder, the base model)."""
    if not isinstance(origin, dict) or not origin.get("name"):
        return ""
    run = f" (run {str(origin['run_id'])[:12]})" if origin.get("run_id") else ""
    return f"models:/{origin['name']}/{origin.get('version')}{run}"


def _tidy_row(row: dict, record: dict, text: str, video_sha: str) -> dict:
    tidy = {
        name: row[name]
        for name in (
            "method",
            "subject",
            "kind",
            "class_word",
            "token",
            "prompt_index",
            "prompt_type",
            "seed",
            "prompt",
            "prompt_template",
            "video",
        )
    }
    tidy.update(
        clip_text=text,
        video_path=str(row["video_path"]),
        video_sha256=video_sha,
        subject_dir=str(row["subject_path"]),  # resolved: the report reads the reference images from it
        method_dir=row["method_dir"],
        num_frames=record["num_frames"],
        height=record["height"],
        width=record["width"],
    )
    tidy.update({name: float(record[name]) for name in METRIC_NAMES})
    tidy["subject_module"] = module_label(row.get("subject_module"))
    sampling = row.get("sampling") or {}
    tidy["sampling"] = json.dumps(sampling, sort_keys=True)
    for name, value in sampling.items():  # flat copies of scalar settings, for grouping and plotting
        if isinstance(value, str | int | float | bool) or value is None:
            tidy[f"sampling_{name}"] = value
    return tidy


# ----------------------------------------------------------------------------------------------- aggregation


#: Sampling settings that differ between methods by design (DWVSS is CustomCrafter's; the base model has no module).
METHOD_SPECIFIC_SETTINGS = ("dwvss",)
#: How ``comparability`` shows a sampling setting that a manifest does not record (an older one without ``dtype``).
NOT_RECORDED = "unknown (not in its manifest)"


def comparability(per_video: pd.DataFrame) -> list[str]:
    """Why the methods' means may not be comparable: one line per method that lacks (subject, prompt, seed) videos
    others have, per subject whose prompts or reference images differ between methods, and per sampling setting
    that differs between methods (other than ``METHOD_SPECIFIC_SETTINGS``)."""
    if per_video["method"].nunique() < 2:
        return []
    keys = {method: set(zip(group["subject"], group["prompt_index"], group["seed"], strict=True))
            for method, group in per_video.groupby("method", sort=False)}
    union = set().union(*keys.values())
    lines = []
    for method, have in keys.items():
        if missing := union - have:
            subjects = sorted({subject for subject, _, _ in missing})
            lines.append(f"method {method!r} lacks {len(missing)} of the {len(union)} (subject, prompt, seed) videos "
                         f"the other methods have (subjects: {', '.join(subjects)}): its means cover other videos")
    return lines + _other_prompts_or_references(per_video) + _other_settings(per_video)


def _other_settings(per_video: pd.DataFrame) -> list[str]:
    """One line per sampling setting (other than ``METHOD_SPECIFIC_SETTINGS``) whose values differ between methods.
    A setting a video's manifest does not record (``dtype`` before it was recorded) is unknown for that video,
    which no recorded value matches."""
    recorded = [(method, json.loads(text)) for method, text in zip(per_video["method"], per_video["sampling"],
                                                                   strict=True)]
    names = {name for _, settings in recorded for name in settings} - set(METHOD_SPECIFIC_SETTINGS)
    lines = []
    for name in sorted(names):
        by_method: dict[str, set[str]] = {}
        for method, settings in recorded:
            value = json.dumps(settings[name], sort_keys=True) if name in settings else NOT_RECORDED
            by_method.setdefault(method, set()).add(value)
        if len(set().union(*by_method.values())) > 1:
            values = "; ".join(f"{method}: {', '.join(sorted(v))}" for method, v in by_method.items())
            lines.append(f"sampling setting {name!r} differs between methods ({values})")
    return lines


def _other_prompts_or_references(per_video: pd.DataFrame) -> list[str]:
    """One line per subject whose reference folder, or whose prompt at the same ``prompt_index`` (read without the
    token, as CLIP-T's 'replace'), differs between methods: such means score other tasks (e.g. a module sampled
    with ``kind: live`` prompts and the base model with ``object`` ones)."""
    if not {"prompt", "token", "class_word", "subject_dir"} <= set(per_video.columns):
        return []
    lines = []
    for subject, group in per_video.groupby("subject", sort=False):
        folders = group.groupby("method", sort=False)["subject_dir"].unique()
        if len({folder for values in folders for folder in values}) > 1:
            where = "; ".join(f"{method}: {', '.join(values)}" for method, values in folders.items())
            lines.append(f"subject {subject!r} is scored against other reference images per method ({where})")
        texts: dict[int, dict[str, set[str]]] = {}
        for row in group.to_dict("records"):
            template = row.get("prompt_template")
            text = clip_text({**row, "prompt_template": template if isinstance(template, str) else None})
            texts.setdefault(int(row["prompt_index"]), {}).setdefault(row["method"], set()).add(text)
        differing = {index: by_method for index, by_method in sorted(texts.items())
                     if len(set().union(*by_method.values())) > 1}
        if differing:
            index, by_method = next(iter(differing.items()))
            example = "; ".join(f"{method}: {' | '.join(sorted(v))!r}" for method, v in by_method.items())
            lines.append(f"subject {subject!r}: prompt_index {', '.join(map(str, differing))} names other prompts "
                         f"per method (prompt {index}: {example})")
    return lines


def _t_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Student-t interval of the mean; NaN with fewer than two values (one subject: undefined)."""
    if len(values) < 2:
        return math.nan, math.nan
    from scipy import stats

    mean = float(values.mean())
    half = float(
        stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    )
    return mean - half, mean + half


def summarize(per_video: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Long table: method × prompt_type (all/motion/static) × metric → mean, ci_low, ci_high, n_subjects, n_videos.

    Per-subject means first, then the mean and Student-t interval across subjects.
    """
    out = []
    for method, by_method in per_video.groupby("method", sort=False):
        for prompt_type in PROMPT_TYPES:
            subset = by_method if prompt_type == "all" else by_method[by_method["prompt_type"] == prompt_type]
            if subset.empty:
                continue
            per_subject = subset.groupby("subject")[list(METRIC_NAMES)].mean()
            for metric in METRIC_NAMES:
                values = per_subject[metric].to_numpy(dtype=float)
                low, high = _t_interval(values, confidence)
                out.append(
                    {
                        "method": method,
                        "prompt_type": prompt_type,
                        "metric": metric,
                        "mean": float(values.mean()),
                        "ci_low": low,
                        "ci_high": high,
                        "n_subjects": len(values),
                        "n_videos": len(subset),
                    }
                )
    return pd.DataFrame(out)


def _metrics_dict(summary: pd.DataFrame) -> dict[str, dict[str, float]]:
    overall = summary[summary["prompt_type"] == "all"]
    return {
        method: dict(zip(group["metric"], group["mean"].astype(float), strict=True))
        for method, group in overall.groupby("method", sort=False)
    }


def _parquet_safe(per_video: pd.DataFrame) -> pd.DataFrame:
    """``per_video`` with every flat ``sampling_*`` column whose values mix types across manifests (``16`` in one,
    ``"16"`` in another) written as text: Arrow needs one type per column. The CSV keeps the values as read."""
    mixed = [name for name in per_video.columns if name.startswith("sampling_") and per_video[name].dtype == object
             and len({type(v) for v in per_video[name] if v is not None and v == v}) > 1]
    if not mixed:
        return per_video
    return per_video.assign(**{name: per_video[name].map(lambda v: v if v is None or v != v else str(v))
                               for name in mixed})


# ----------------------------------------------------------------------------------------------- entry point


def evaluate(method_dirs: list[Path], out_dir: Path, config: EvalConfig | None = None) -> EvalResult:
    """Score every video of every method folder and write the tables and reports into ``out_dir``."""
    from customcrafter.evaluation.report import render_html_report, render_markdown_summary

    config = config or EvalConfig()
    method_dirs, out_dir = [Path(d) for d in method_dirs], Path(out_dir)
    rows = _read_all_manifests(method_dirs)  # validates everything before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("evaluating %d videos from %d folders into %s", len(rows), len(method_dirs), out_dir)

    records, computed = _score_rows(rows, out_dir / CACHE_NAME, config)
    per_video = pd.DataFrame(records)
    summary = summarize(per_video, config.confidence)
    warnings = comparability(per_video)
    for line in warnings:
        logger.warning("not like for like: %s", line)

    paths = {
        name: out_dir / name
        for name in ("per_video.csv", "per_video.parquet", "summary.csv", "report.html", "summary.md")
    }
    atomic_write_bytes(paths["per_video.csv"], per_video.to_csv(index=False).encode())
    atomic_write_bytes(paths["per_video.parquet"], _parquet_safe(per_video).to_parquet(index=False))
    atomic_write_bytes(paths["summary.csv"], summary.to_csv(index=False).encode())
    atomic_write_bytes(paths["summary.md"], render_markdown_summary(summary, per_video, config, warnings).encode())
    atomic_write_bytes(paths["report.html"], render_html_report(summary, per_video, config, warnings).encode())
    save_config(config, out_dir / "eval_config.json")
    logger.info(
        "scored %d videos (%d from cache); report: %s", len(rows), len(rows) - computed, paths["report.html"]
    )
    return EvalResult(
        per_video_csv=paths["per_video.csv"],
        per_video_parquet=paths["per_video.parquet"],
        summary_csv=paths["summary.csv"],
        report_html=paths["report.html"],
        summary_md=paths["summary.md"],
        metrics=_metrics_dict(summary),
        num_videos=len(rows),
        num_computed=computed,
        summary=summary,
        warnings=warnings,
    )
