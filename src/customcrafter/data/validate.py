"""Great Expectations validation of the subject data: ``customcrafter data validate``.

Two expectation suites over the manifest (:mod:`customcrafter.data.manifest`): one on the image rows (decodable,
known format and pixel mode, a defined EXIF orientation, minimum side, sane aspect, non-empty, no duplicate
hashes) and one on the subject rows (safe name, class word present, token well-formed, kind known, enough images,
readable ``subject.yaml``). The results are
written as JSON and as GX's own HTML rendering (the data docs page of a validation result), to be logged as
pipeline artifacts.

Great Expectations takes seconds to import, so it is imported here, lazily, and nowhere on the training path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field

from customcrafter.config import StrictModel
from customcrafter.data.images import ACCEPTED_FORMATS, CONVERTIBLE_MODES, EXIF_ORIENTATIONS, ImageLimits
from customcrafter.data.manifest import build_manifest
from customcrafter.data.subjects import CLASS_WORD_PATTERN, NAME_PATTERN, TOKEN_PATTERN
from customcrafter.utils import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["ValidationConfig", "ValidationResult", "validate_data", "build_suites"]


class ValidationConfig(StrictModel):
    """Thresholds of the suites (the same defaults as ingestion, so ingested data always passes)."""

    min_images: int = Field(3, ge=1, description="images per subject")
    min_side: int = Field(256, ge=1, description="shorter image side in pixels")
    max_aspect: float = Field(4.0, ge=1.0, description="longer side / shorter side")
    max_pixels: int = Field(64_000_000, ge=1, description="larger images are not decoded (possible bombs)")


@dataclass
class ValidationResult:
    """``problems`` maps a subject name to one line per failed check (empty when ``success``)."""

    success: bool
    json_path: Path | None
    html_path: Path | None
    problems: dict[str, list[str]] = field(default_factory=dict)
    n_subjects: int = 0
    n_images: int = 0
    seconds: float = 0.0


def build_suites(config: ValidationConfig):
    """The two GX expectation suites: ``(images_suite, subjects_suite)``."""
    import great_expectations as gx

    e = gx.expectations
    images = gx.ExpectationSuite("customcrafter_images", expectations=[
        e.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True]),
        e.ExpectColumnValuesToBeInSet(column="format", value_set=sorted(ACCEPTED_FORMATS)),
        e.ExpectColumnValuesToBeInSet(column="mode", value_set=sorted(CONVERTIBLE_MODES)),
        e.ExpectColumnValuesToBeBetween(column="exif_orientation", min_value=EXIF_ORIENTATIONS.start,
                                        max_value=EXIF_ORIENTATIONS.stop - 1),
        e.ExpectColumnValuesToBeBetween(column="bytes", min_value=1),
        e.ExpectColumnValuesToBeBetween(column="min_side", min_value=config.min_side),
        e.ExpectColumnValuesToBeBetween(column="aspect", min_value=1.0, max_value=config.max_aspect),
        e.ExpectColumnValuesToBeUnique(column="sha256"),
    ])
    subjects = gx.ExpectationSuite("customcrafter_subjects", expectations=[
        e.ExpectColumnValuesToMatchRegex(column="folder_name", regex=NAME_PATTERN),
        e.ExpectColumnValuesToBeInSet(column="yaml_ok", value_set=[True]),
        e.ExpectColumnValuesToNotBeNull(column="class_word"),
        e.ExpectColumnValuesToMatchRegex(column="class_word", regex=CLASS_WORD_PATTERN),
        e.ExpectColumnValuesToMatchRegex(column="token", regex=TOKEN_PATTERN),
        e.ExpectColumnValuesToBeInSet(column="kind", value_set=["live", "object"]),
        e.ExpectColumnValuesToBeBetween(column="n_images", min_value=config.min_images),
    ])
    return images, subjects


def _run_suite(context, name: str, frame, suite):
    batch_definition = (context.data_sources.add_pandas(name).add_dataframe_asset(name)
                        .add_batch_definition_whole_dataframe(name))
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    return batch.validate(suite, result_format="COMPLETE")


def _describe(expectation_result) -> str:
    config = expectation_result.expectation_config
    kwargs = {k: _plain(v) for k, v in config.kwargs.items() if k not in ("batch_id", "column")}
    return f"{config.type}({config.kwargs.get('column')}, {kwargs})" if kwargs else f"{config.type}"


def _problems(result, frame, label_column: str, detail) -> dict[str, list[str]]:
    """Failed rows of each expectation → ``{subject: ["<file or field>: <check> (value)"]}``."""
    problems: dict[str, list[str]] = {}
    for expectation_result in result.results:
        if expectation_result.success:
            continue
        column = expectation_result.expectation_config.kwargs.get("column")
        indices = expectation_result.result.get("unexpected_index_list") or []
        if not indices:  # a failure with no rows to point at (e.g. the frame is empty)
            problems.setdefault("*", []).append(f"{_describe(expectation_result)} failed")
        for index in indices:
            row = frame.loc[index]
            problems.setdefault(row["subject"], []).append(
                f"{detail(row)}: {column}={_plain(row[column])!r} fails {_describe(expectation_result)}")
    return problems


def _plain(value):
    """A frame cell as the manifest wrote it: NaN → None, a whole float (an int column with gaps) → int."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) else int(value) if value.is_integer() else value
    return value


def _image_detail(row) -> str:
    error = _plain(row.get("error"))
    return f"{row['path']}" + (f" ({error})" if error else "")


def _subject_detail(row) -> str:
    error = _plain(row.get("yaml_error"))
    return f"subject {row['folder_name']}" + (f" ({error})" if error else "")


def validate_data(data_root: str | Path = "data", subjects: list[str | Path] | None = None,
                  out_dir: str | Path | None = None, config: ValidationConfig | None = None) -> ValidationResult:
    """Validate every subject under ``data_root`` (or the given ones: names there, or folders as ``Path``); write
    JSON + HTML results to ``out_dir``.

    Returns a :class:`ValidationResult`; it does not raise on invalid data (the caller decides), only on a missing
    ``data_root``/subject.
    """
    config = config or ValidationConfig()
    start = time.perf_counter()
    limits = ImageLimits(min_side=config.min_side, max_aspect=config.max_aspect, max_pixels=config.max_pixels)
    images, subject_table = build_manifest(data_root, subjects, limits)

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines are import chatter
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    try:  # the per-metric progress bars are noise in a CLI and in pipeline logs
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # noqa: BLE001 - cosmetic only
        logger.debug("could not disable GX progress bars")
    images_suite, subjects_suite = build_suites(config)
    image_result = _run_suite(context, "images", images, images_suite)
    subject_result = _run_suite(context, "subjects", subject_table, subjects_suite)

    problems = _problems(image_result, images, "path", _image_detail)
    for name, lines in _problems(subject_result, subject_table, "folder_name", _subject_detail).items():
        problems.setdefault(name, []).extend(lines)
    success = bool(image_result.success and subject_result.success)
    if subject_table.empty:  # a gate that passes with no data would wave an empty `dvc pull` through
        problems[str(Path(data_root) / "subjects")] = ["no subjects to validate (run `dvc pull`, or `customcrafter "
                                                       "data add`)"]
        success = False

    json_path = html_path = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        report = {"success": success, "problems": problems, "n_subjects": len(subject_table),
                  "n_images": len(images), "config": config.model_dump(),
                  "manifest": {"images": json.loads(images.to_json(orient="records")),
                               "subjects": json.loads(subject_table.to_json(orient="records"))},
                  "great_expectations": {"images": image_result.to_json_dict(),
                                         "subjects": subject_result.to_json_dict()}}
        json_path = out_dir / "validation.json"
        atomic_write_bytes(json_path, json.dumps(report, indent=2, default=str).encode())
        html_path = out_dir / "validation.html"
        atomic_write_bytes(html_path, _render_html(image_result, subject_result).encode())

    seconds = time.perf_counter() - start
    logger.info("validated %d subjects, %d images in %.1f s: %s", len(subject_table), len(images), seconds,
                "passed" if success else f"{sum(map(len, problems.values()))} problem(s)")
    return ValidationResult(success=success, json_path=json_path, html_path=html_path, problems=problems,
                            n_subjects=len(subject_table), n_images=len(images), seconds=seconds)


def _render_html(*results) -> str:
    """GX's data-docs rendering of each validation result, the pages' bodies joined into one HTML file."""
    from great_expectations.render.renderer import ValidationResultsPageRenderer
    from great_expectations.render.view import DefaultJinjaPageView

    pages = [DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(r)) for r in results]
    if len(pages) == 1:
        return pages[0]
    # Each page is a full document; keep the first's <head> and stack the bodies.
    head, _, rest = pages[0].partition("<body")
    bodies = ["<body" + rest.rsplit("</body>", 1)[0]] + [
        "<div" + p.partition("<body")[2].rsplit("</body>", 1)[0] + "</div>" for p in pages[1:]]
    return head + "\n<hr/>\n".join(bodies) + "</body></html>"
