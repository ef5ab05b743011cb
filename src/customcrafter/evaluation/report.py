"""The evaluation report: one self-contained HTML file (tables, plots, video grid) and a Markdown summary.

Everything is embedded (plots as PNG, videos as downscaled GIFs, reference images as PNG thumbnails, all base64
data URIs) so the report can be attached to an MLflow run or mailed as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from customcrafter.evaluation.config import METRIC_NAMES, EvalConfig
from customcrafter.evaluation.videos import (
    encode_gif,
    encode_png_thumbnail,
    load_rgb_image,
    read_video_frames,
    reference_image_paths,
)

__all__ = ["render_html_report", "render_markdown_summary", "PAPER_TABLE1", "METRIC_LABELS"]

METRIC_LABELS = {
    "clip_t": "CLIP-T",
    "clip_i": "CLIP-I",
    "dino_i": "DINO-I",
    "temporal_consistency": "T. Cons.",
    "motion": "Motion (px/frame)",
    "dynamic_degree": "Dynamic degree",
}

# The paper's Table 1 (CustomCrafter, AAAI 2025), as reported there: shown beside our numbers for reference only.
PAPER_TABLE1 = {
    "CustomCrafter": {"clip_t": 0.318, "clip_i": 0.786, "dino_i": 0.627, "temporal_consistency": 0.994},
    "Custom Diffusion": {"clip_t": 0.289, "clip_i": 0.759, "dino_i": 0.546, "temporal_consistency": 0.990},
    "DreamVideo": {"clip_t": 0.298, "clip_i": 0.724, "dino_i": 0.489, "temporal_consistency": 0.992},
}


def _fmt(value: float, digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _cell(row: pd.Series) -> str:
    """'0.318 [0.301, 0.335]', or just the mean when the interval is undefined (one subject)."""
    digits = 2 if row["metric"] == "motion" else 3
    text = _fmt(row["mean"], digits)
    if not math.isnan(row["ci_low"]):
        text += f" [{_fmt(row['ci_low'], digits)}, {_fmt(row['ci_high'], digits)}]"
    return text


def _wide(summary: pd.DataFrame, prompt_type: str = "all") -> pd.DataFrame:
    part = summary[summary["prompt_type"] == prompt_type].copy()
    part["cell"] = part.apply(_cell, axis=1)
    wide = part.pivot(index="method", columns="metric", values="cell")
    order = list(dict.fromkeys(part["method"]))
    return wide.reindex(index=order, columns=list(METRIC_NAMES))


# ----------------------------------------------------------------------------------------------- Markdown


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def render_markdown_summary(summary: pd.DataFrame, per_video: pd.DataFrame, config: EvalConfig,
                            warnings: list[str] = ()) -> str:
    """Terminal/MLflow summary: the per-method table and the motion/static breakdown (after ``warnings``, the
    reasons the methods may not be comparable)."""
    header = ["method"] + [METRIC_LABELS[m] for m in METRIC_NAMES]
    counts = summary[(summary["prompt_type"] == "all") & (summary["metric"] == METRIC_NAMES[0])]
    n_text = ", ".join(
        f"{r.method}: {r.n_subjects} subjects / {r.n_videos} videos" for r in counts.itertuples()
    )
    parts = [
        "# Evaluation summary",
        "",
        *[f"> **Not like for like:** {line}" for line in warnings],
        *([""] if warnings else []),
        f"Mean over subjects (per-subject means first) [{config.confidence:.0%} t-interval across subjects; blank "
        f"with one subject]. {n_text}. CLIP: `{config.clip_model}`, DINO: `{config.dino_model}`.",
        "",
        _markdown_table(
            header,
            [
                [m, *cells]
                for m, cells in zip(
                    _wide(summary).index, _wide(summary).fillna("").values.tolist(), strict=True
                )
            ],
        ),
    ]
    for prompt_type in ("motion", "static"):
        if (summary["prompt_type"] == prompt_type).any():
            wide = _wide(summary, prompt_type).fillna("")
            parts += [
                "",
                f"## {prompt_type} prompts",
                "",
                _markdown_table(
                    header, [[m, *cells] for m, cells in zip(wide.index, wide.values.tolist(), strict=True)]
                ),
            ]
    origins = _module_origins(per_video)
    if origins:
        parts += ["", "Registered subject modules: " + "; ".join(f"{m}: {o}" for m, o in origins.items())]
    parts += [
        "",
        "Paper's Table 1 (reported in the paper, not measured here): "
        + "; ".join(
            f"{name} " + "/".join(f"{v:.3f}" for v in vals.values()) for name, vals in PAPER_TABLE1.items()
        )
        + " (CLIP-T/CLIP-I/DINO-I/T. Cons.)",
        "",
    ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- plots


def _png_data_uri(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _bar_plots(summary: pd.DataFrame) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = summary[summary["prompt_type"] == "all"]
    methods = list(dict.fromkeys(overall["method"]))
    figure, axes = plt.subplots(1, len(METRIC_NAMES), figsize=(3.0 * len(METRIC_NAMES), 3.2))
    for axis, metric in zip(axes, METRIC_NAMES, strict=True):
        part = overall[overall["metric"] == metric].set_index("method").reindex(methods)
        means = part["mean"].to_numpy(dtype=float)
        errors = np.vstack(
            [means - part["ci_low"].to_numpy(dtype=float), part["ci_high"].to_numpy(dtype=float) - means]
        )
        axis.bar(
            range(len(methods)),
            means,
            yerr=np.nan_to_num(errors),
            capsize=3,
            color=f"C{METRIC_NAMES.index(metric)}",
        )
        axis.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        axis.set_title(METRIC_LABELS[metric], fontsize=10)
        finite = means[np.isfinite(means)]
        if metric in ("clip_i", "temporal_consistency") and finite.size:  # near 1: zoom so differences show
            axis.set_ylim(max(0.0, finite.min() - 0.1), min(1.0, finite.max() + 0.02) + 1e-6)
    figure.tight_layout()
    return _png_data_uri(figure)


def _fidelity_motion_scatter(per_video: pd.DataFrame) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    for index, (method, group) in enumerate(per_video.groupby("method", sort=False)):
        per_subject = group.groupby("subject")[["dino_i", "motion"]].mean()
        axis.scatter(per_subject["motion"], per_subject["dino_i"], color=f"C{index}", alpha=0.45, s=18)
        axis.scatter(
            per_subject["motion"].mean(),
            per_subject["dino_i"].mean(),
            color=f"C{index}",
            s=110,
            marker="*",
            edgecolor="black",
            label=method,
        )
    axis.set_xlabel("motion: mean optical-flow magnitude (px/frame)")
    axis.set_ylabel("subject fidelity: DINO-I")
    axis.set_title("Subject fidelity vs motion (dots: subjects, stars: method means)", fontsize=9)
    axis.legend(fontsize=8)
    return _png_data_uri(figure)


# ----------------------------------------------------------------------------------------------- HTML


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222} table{border-collapse:collapse;margin:8px 0 20px}
th,td{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:middle} th{background:#f3f3f3}
tr.paper td{color:#666;font-style:italic;background:#fafafa} .note{color:#555;font-size:13px;max-width:960px}
.grid td{text-align:center} .grid td.prompt{text-align:left;max-width:220px;font-size:12px} img{display:block;margin:auto}
.refs img{margin:2px} .warn{background:#fff4e5;border-left:4px solid #e8a33d;padding:6px 10px;max-width:960px}
"""


def _html_table(header: list[str], rows: list[tuple[list[str], str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr class='{cls}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for cells, cls in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _comparison_table(summary: pd.DataFrame, config: EvalConfig) -> str:
    wide = _wide(summary).fillna("")
    rows = [([method, *cells], "") for method, cells in zip(wide.index, wide.values.tolist(), strict=True)]
    if config.report.show_paper_table:
        rows += [
            (
                [
                    f"{name} (paper's Table 1)",
                    *[_fmt(values[m]) if m in values else "—" for m in METRIC_NAMES],
                ],
                "paper",
            )
            for name, values in PAPER_TABLE1.items()
        ]
    return _html_table(["method", *[METRIC_LABELS[m] for m in METRIC_NAMES]], rows)


def _breakdown_table(summary: pd.DataFrame) -> str:
    rows = []
    for prompt_type in ("motion", "static"):
        if (summary["prompt_type"] == prompt_type).any():
            wide = _wide(summary, prompt_type).fillna("")
            rows += [
                ([method, prompt_type, *cells], "")
                for method, cells in zip(wide.index, wide.values.tolist(), strict=True)
            ]
    return _html_table(["method", "prompts", *[METRIC_LABELS[m] for m in METRIC_NAMES]], rows)


def _data_uri(kind: str, data: bytes) -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def _video_grid(per_video: pd.DataFrame, config: EvalConfig) -> str:
    """Figure-3 style: per subject, rows of prompts, columns of methods; the reference images first (lowest seed)."""
    methods = list(dict.fromkeys(per_video["method"]))
    subjects = list(dict.fromkeys(per_video.sort_values("subject")["subject"]))
    if config.report.grid_max_subjects is not None:
        subjects = subjects[: config.report.grid_max_subjects]
    seed = per_video.groupby("subject")["seed"].min()
    sections = []
    for subject in subjects:
        rows = per_video[(per_video["subject"] == subject) & (per_video["seed"] == seed[subject])]
        prompts = rows.sort_values("prompt_index").drop_duplicates("prompt_index")
        refs = reference_image_paths(rows.iloc[0]["subject_dir"])
        thumbs = "".join(
            f"<img src='{_data_uri('png', encode_png_thumbnail(load_rgb_image(p), config.report.reference_thumb_size))}' alt='{html.escape(p.name)}'>"
            for p in refs[:4]
        )
        head = (
            "<tr><th>reference images</th><th>prompt</th>"
            + "".join(f"<th>{html.escape(m)}</th>" for m in methods)
            + "</tr>"
        )
        body = []
        for position, prompt_row in enumerate(prompts.itertuples()):
            cells = []
            if position == 0:
                cells.append(f"<td class='refs' rowspan='{len(prompts)}'>{thumbs}</td>")
            cells.append(
                f"<td class='prompt'>{html.escape(prompt_row.prompt)}<br><small>({prompt_row.prompt_type}, "
                f"seed {prompt_row.seed})</small></td>"
            )
            for method in methods:
                match = rows[(rows["method"] == method) & (rows["prompt_index"] == prompt_row.prompt_index)]
                if match.empty:
                    cells.append("<td>—</td>")
                    continue
                video = match.iloc[0]
                frames = read_video_frames(video["video_path"], num_frames=json.loads(video["sampling"]).get("num_frames"))
                gif = encode_gif(frames, config.report.grid_gif_size, config.report.grid_fps)
                title = f"CLIP-T {video['clip_t']:.3f}, DINO-I {video['dino_i']:.3f}, motion {video['motion']:.2f}"
                cells.append(
                    f"<td><img src='{_data_uri('gif', gif)}' title='{html.escape(title)}' "
                    f"alt='{html.escape(method)}'></td>"
                )
            body.append("<tr>" + "".join(cells) + "</tr>")
        sections.append(f"<h3>{html.escape(subject)}</h3><table class='grid'>{head}{''.join(body)}</table>")
    return "".join(sections)


def _module_origins(per_video: pd.DataFrame) -> dict[str, str]:
    """Per method, the registered model version(s) its videos were sampled with, where the manifests record them
    (``sample-eval-set --subject-module models:/...``); methods without a record are left out."""
    if "subject_module" not in per_video:
        return {}
    origins = {}
    for method, group in per_video.groupby("method", sort=False):
        labels = sorted({label for label in group["subject_module"] if label})
        if labels:
            unrecorded = " + videos without a record" if (group["subject_module"] == "").any() else ""
            origins[method] = ", ".join(labels) + unrecorded
    return origins


def _sampling_table(per_video: pd.DataFrame) -> str:
    origins, rows = _module_origins(per_video), []
    for method, group in per_video.groupby("method", sort=False):
        settings = sorted(set(group["sampling"]))
        rows.append(([method, origins.get(method, "not recorded"),
                      " | ".join(json.dumps(json.loads(s)) for s in settings)], ""))
    return _html_table(["method", "registered subject module", "sampling settings"], rows)


def render_html_report(summary: pd.DataFrame, per_video: pd.DataFrame, config: EvalConfig,
                       warnings: list[str] = ()) -> str:
    """The full self-contained HTML report (no external files)."""
    n_subjects, n_videos = per_video["subject"].nunique(), len(per_video)
    notices = "".join(f"<p class='warn'><b>Not like for like:</b> {html.escape(line)}</p>\n" for line in warnings)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html><html><head><meta charset='utf-8'><title>CustomCrafter evaluation</title>
<style>{_STYLE}</style></head><body>
<h1>CustomCrafter evaluation</h1>
<p class='note'>{n_videos} videos, {n_subjects} subjects, {per_video["method"].nunique()} methods; generated {stamp}.
CLIP <code>{html.escape(config.clip_model)}</code>, DINO <code>{html.escape(config.dino_model)}</code>,
CLIP-T text: token handling <code>{config.token_handling}</code>.</p>
{notices}<h2>Comparison (Table 1 style)</h2>
<p class='note'>Each cell: mean over subjects (each subject's videos averaged first) and the {config.confidence:.0%}
Student-t interval across subjects (blank with one subject). Motion is the mean Farnebäck optical-flow magnitude
(pixels per frame); dynamic degree is the fraction of videos that move (VBench rule). Grey italic rows are the
numbers <b>reported in the paper's Table 1</b>, not measured here: they used their own models and prompts.</p>
{_comparison_table(summary, config)}
<h2>Motion vs static prompts</h2>
{_breakdown_table(summary)}
<h2>Plots</h2>
<img src='{_bar_plots(summary)}' alt='metrics per method'>
<img src='{_fidelity_motion_scatter(per_video)}' alt='subject fidelity vs motion'>
<h2>Videos</h2>
<p class='note'>Rows: prompts; columns: methods; first column: the subject's reference images. Hover a video for its
metrics. Downscaled GIF previews of the lowest seed.</p>
{_video_grid(per_video, config)}
<h2>Sampling settings</h2>
{_sampling_table(per_video)}
</body></html>
"""
