"""Sampling: one prompt, or the evaluation set, for a base pipeline with zero or more subject modules loaded.

CustomCrafter modules (LoRA) sample with DWVSS by default; baselines (Custom Diffusion, DreamVideo) sample with
plain DDIM at full strength - their weights are simply part of the model. Paper settings: DDIM 50 steps, η 1.0,
CFG 12 with an empty negative prompt, 16 frames at 320×512, fps = the module's training fps (16).
"""

from __future__ import annotations

import contextlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator

from customcrafter.config import StrictModel
from customcrafter.dwvss import DWVSSConfig, dwvss_sampling
from customcrafter.subject_module import loaded_modules
from customcrafter.utils import atomic_write_bytes

__all__ = ["SampleConfig", "sample_video", "sample_evaluation_set", "evaluation_set_rows", "DEFAULT_BASE_FPS",
           "last_sampling_record"]

logger = logging.getLogger(__name__)

#: VideoCrafter2's default fps conditioning, used when no subject module says otherwise.
DEFAULT_BASE_FPS = 28
#: The base model's fps conditioning in an evaluation set: the rate the modules it is compared with are trained and
#: sampled at (TrainConfig.fps, the reference code's 16), so its motion is a like-for-like reference.
EVALUATION_BASE_FPS = 16


class SampleConfig(StrictModel):
    """Sampler settings. Defaults = the paper's evaluation."""

    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(12.0, ge=0)
    eta: float = Field(1.0, ge=0, description="DDIM eta (1.0 = the paper's stochastic DDIM)")
    fps: int | None = Field(None, ge=1, description="None = the loaded module's training fps, else 28")
    num_frames: int = Field(16, ge=1)
    height: int = Field(320, ge=8, multiple_of=8)
    width: int = Field(512, ge=8, multiple_of=8)
    negative_prompt: str = ""
    dwvss: DWVSSConfig | None = Field(default_factory=DWVSSConfig, description="None = constant LoRA scale 1; "
                                                                                "reference mode needs dwvss.k < "
                                                                                "num_inference_steps")

    @model_validator(mode="after")
    def _check_dwvss_steps(self) -> SampleConfig:
        if self.dwvss is not None:
            self.dwvss.check_steps(self.num_inference_steps)
        return self


def _resolve_fps(pipe, config: SampleConfig) -> int:
    if config.fps is not None:
        return config.fps
    modules = loaded_modules(pipe)
    if not modules:
        return DEFAULT_BASE_FPS
    rates = {m.fps for m in modules}
    if len(rates) > 1:
        logger.warning("loaded modules were trained at different fps %s; sampling at %d", sorted(rates),
                       modules[0].fps)
    return modules[0].fps


def _check_tokens(pipe, prompt: str) -> None:
    modules = loaded_modules(pipe)
    if modules and not any(m.token in prompt for m in modules):
        tokens = ", ".join(m.token for m in modules)
        logging.warning("prompt %r contains no loaded subject token (%s): the subject will not appear", prompt,
                        tokens)


def last_sampling_record(pipe) -> dict:
    """What the last :func:`sample_video` call used (scale per step, skipped steps, fps); for tests and logs."""
    return dict(pipe.__dict__.get("_last_sampling", {}))


def sample_video(pipe, prompt: str, *, seed: int = 0, config: SampleConfig | None = None, method: str | None = None,
                 **overrides) -> np.ndarray:
    """Sample one video; returns uint8 frames ``(T, H, W, 3)``.

    ``overrides`` replace fields of ``config`` (e.g. ``num_inference_steps=25``). ``method`` is accepted for
    callers that know it; what is loaded on ``pipe`` decides how to sample (DWVSS only for LoRA modules).
    """
    config = (config or SampleConfig()).model_copy(update=overrides) if overrides else (config or SampleConfig())
    config = SampleConfig.model_validate(config.model_dump())  # validate overrides too
    _check_tokens(pipe, prompt)
    fps = _resolve_fps(pipe, config)
    lora_names = [m.adapter_name for m in loaded_modules(pipe) if m.uses_lora]
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    record: dict = {"fps": fps, "seed": seed, "scales": [], "skipped": []}
    schedule = (dwvss_sampling(pipe.unet, config.dwvss, config.num_inference_steps, adapter_names=lora_names)
                if lora_names else contextlib.nullcontext(None))
    with schedule as callback:
        output = pipe(prompt, negative_prompt=config.negative_prompt, num_inference_steps=config.num_inference_steps,
                      guidance_scale=config.guidance_scale, eta=config.eta, fps=fps, num_frames=config.num_frames,
                      height=config.height, width=config.width, generator=generator, output_type="np",
                      on_step_begin=callback)
        if callback is not None:
            record["scales"], record["skipped"] = list(callback.recorded), list(callback.skipped)
    pipe.__dict__["_last_sampling"] = record
    frames = np.asarray(output.frames[0])
    if frames.dtype != np.uint8:
        raise TypeError(f"pipeline returned {frames.dtype} frames, expected uint8")
    return frames


def _sampling_settings(pipe, config: SampleConfig) -> dict:
    """What a manifest records: the config, the resolved fps, and ``dtype``, the precision the UNet runs at (from the
    pipeline, not the asked ``SpeedConfig.dtype``: the CPU runs fp32 whatever was asked). The rest of SpeedConfig
    (compile, kernels, layer rewrites) computes the same function at that precision, so it is not recorded."""
    from customcrafter.performance import dtype_name

    settings = config.model_dump(mode="json")
    settings["fps"] = _resolve_fps(pipe, config)
    settings["dtype"] = dtype_name(pipe.unet.dtype)
    return settings


def evaluation_set_rows(out_dir: str | Path) -> list[dict]:
    """The rows of an evaluation-set folder's ``manifest.jsonl`` as written (none without one), for a rerun to
    check against; a line that is not a JSON object is a ``ValueError`` naming it. (``customcrafter.evaluation``'s
    ``read_manifest`` is the strict reader for scoring: it also needs every video on disk.)"""
    manifest = Path(out_dir) / "manifest.jsonl"
    if not manifest.is_file():
        return []
    rows = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"{manifest}:{number}: expected a JSON object, got {row!r}")
            rows.append(row)
    return rows


#: in an evaluation-set folder: the sampling settings and registered model (or null) of the run sampling into it,
#: written before its first video, so that the videos an interrupted run leaves (no manifest lists them yet) are
#: checked on a rerun as the manifest's are
RUN_MARK = ".sampling_run.json"


def _kept_rows(out_dir: Path) -> list[dict]:
    """What a rerun must check its settings against: the manifest's rows whose video is on disk and, for videos on
    disk that no manifest lists (an interrupted run's), one row from :data:`RUN_MARK`. An interrupted run without one
    (older than the mark) gives a row with neither field: its settings unchecked, as before, its registered origin
    unknown."""
    listed_rows = evaluation_set_rows(out_dir)
    listed = {row.get("video") for row in listed_rows}
    rows = [row for row in listed_rows if isinstance(row.get("video"), str) and (out_dir / row["video"]).is_file()]
    unlisted = sorted(v.relative_to(out_dir).as_posix() for v in out_dir.glob("*/*.mp4")
                      if not v.name.startswith(".") and v.relative_to(out_dir).as_posix() not in listed)
    if unlisted:
        try:
            mark = json.loads((out_dir / RUN_MARK).read_text())
        except (FileNotFoundError, ValueError):
            mark = None
        rows.append({**(mark if isinstance(mark, dict) else {}), "video": unlisted[0]})
    return rows


def _resumed_settings(out_dir: Path, settings: dict, kept: list[dict]) -> dict:
    """The settings the folder's new manifest records. A rerun keeps the videos on disk: refuse if the folder's
    manifest (or run mark; ``kept``: :func:`_kept_rows`) says they were sampled with other settings (the new manifest
    would label them with these). A setting an older manifest did not record (``dtype``) stays unrecorded: the kept
    videos' value is unknown."""
    recorded = set(settings)
    for row in kept:
        held, video = row.get("sampling"), row["video"]
        if held is None and "subject_module" not in row:  # an unmarked interrupted run: nothing to check against
            continue
        held = held or {}
        known = {name: value for name, value in settings.items() if name in held}
        if held != known:
            changed = ", ".join(f"{name} {held.get(name)!r} -> {known.get(name)!r}"
                                for name in sorted(set(held) | set(known)) if held.get(name) != known.get(name))
            raise ValueError(f"{out_dir}: its videos ({video}, ...) were sampled with other settings "
                             f"({changed}); a rerun only samples missing videos, so delete the folder to sample "
                             "afresh, or rerun with the same settings")
        recorded &= set(held)
    return {name: value for name, value in settings.items() if name in recorded}


#: what identifies a registered module's weights in a manifest's ``subject_module`` (its URI and alias only say how
#: it was named: models:/NAME@champion and models:/NAME/3 may be the same version)
MODULE_ORIGIN_IDENTITY = ("name", "version", "run_id")


def _identity(origin: dict | None) -> dict | None:
    return {name: origin.get(name) for name in MODULE_ORIGIN_IDENTITY} if origin else None


def _other_origin(out_dir: Path, video: str, held: dict, origin: dict | None) -> ValueError:
    this = f"{origin['name']} v{origin['version']}" if origin else "a subject module folder"
    return ValueError(f"{out_dir}: its videos ({video}, ...) were sampled with registered model {held.get('name')} "
                      f"v{held.get('version')} (run {held.get('run_id')}), this run with {this}; a rerun only samples "
                      "missing videos, so delete the folder to sample afresh, or rerun with the same subject module")


def resumed_module_origin(out_dir: str | Path, origin: dict | None, kept: list[dict] | None = None) -> dict | None:
    """The registered model (``subject_module``: name, version, alias, run id, URI) the folder's new manifest records,
    None for a module folder. A rerun keeps the videos on disk: refuse if the folder's manifest, or for the videos an
    interrupted run left (which no manifest lists) its :data:`RUN_MARK`, says they came from another registered
    version (or from one, while this run samples a module folder). Videos whose origin was not recorded (a module
    folder, an older manifest, an interrupted run without a mark) leave it unrecorded: theirs is unknown. ``kept``:
    :func:`_kept_rows` of ``out_dir``, when the caller has read them already."""
    out_dir = Path(out_dir)
    identity, recorded = _identity(origin), origin
    for row in kept if kept is not None else _kept_rows(out_dir):
        held, video = row.get("subject_module"), row["video"]
        if not isinstance(held, dict):
            recorded = None
            continue
        if _identity(held) != identity:
            raise _other_origin(out_dir, video, held, origin)
    return recorded


def sample_evaluation_set(pipe, *, method: str, subject: str, subject_dir: str | Path, out_dir: str | Path,
                          seeds: list[int], prompt_limit: int | None = None, config: SampleConfig | None = None,
                          kind: str | None = None, class_word: str | None = None,
                          token: str | None = None, module_origin: dict | None = None) -> Path:
    """Sample every evaluation prompt × seed; write ``out_dir/<subject>/pNN_sS.mp4`` and ``out_dir/manifest.jsonl``.

    Rows follow docs/ARCHITECTURE.md "Method outputs". Resumable: a video already on disk is not sampled again.
    Class word, kind and token come from the loaded module / subject.yaml unless given. ``module_origin``: the
    registered model the module was resolved from (see :func:`resumed_module_origin`), recorded in every row.
    """
    from customcrafter.evaluation.prompts import evaluation_prompts, format_prompt
    from customcrafter.training.dataset import resolve_subject
    from customcrafter.video_io import export_mp4

    config = config or SampleConfig()
    out_dir = Path(out_dir)
    modules = loaded_modules(pipe)
    module_meta = modules[-1].meta if modules else {}
    info = resolve_subject(subject_dir, class_word or module_meta.get("class_word"), None,
                           kind or module_meta.get("kind"))
    token = token if token is not None else (modules[-1].token if modules else "")
    class_word = info.class_word
    prompts = evaluation_prompts(info.kind)[: prompt_limit or None]
    if config.dwvss is not None and not any(m.uses_lora for m in modules):
        config = config.model_copy(update={"dwvss": None})  # baselines / base model: plain DDIM
    if config.fps is None and not modules:  # the base model as the motion reference: conditioned like the modules
        config = config.model_copy(update={"fps": EVALUATION_BASE_FPS})
    kept = _kept_rows(out_dir)  # the manifest and the videos on disk, read once for both checks
    settings = _resumed_settings(out_dir, _sampling_settings(pipe, config), kept)
    origin = resumed_module_origin(out_dir, module_origin, kept)
    (out_dir / subject).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / RUN_MARK, json.dumps({"sampling": settings, "subject_module": origin}).encode())
    rows = []
    # Each video is encoded (H.264, a subprocess: ~0.2-0.7 s) on a writer thread while the next one samples, so the
    # GPU does not wait for it; at most one export is in flight. Leaving the block waits for it, also on errors.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="customcrafter-export") as writer:
        export = None
        for prompt in prompts:
            text = format_prompt(prompt.template, token, class_word)
            for seed in seeds:
                relative = f"{subject}/p{prompt.index:02d}_s{seed}.mp4"
                target = out_dir / relative
                if not target.is_file():
                    logger.info("sampling %s (%d/%d): %s", target, len(rows) + 1, len(prompts) * len(seeds), text)
                    frames = sample_video(pipe, text, seed=seed, config=config)
                    if export is not None:
                        export.result()  # the previous video's, written meanwhile; re-raises its error
                    # written to a temporary file and renamed: an interrupted run leaves whole videos only
                    export = writer.submit(export_mp4, frames, target, fps=8)
                else:
                    logger.info("exists, skipped: %s", target)
                rows.append({"method": method, "subject": subject, "subject_dir": str(subject_dir),
                             "class_word": class_word, "token": token, "kind": info.kind, "prompt": text,
                             "prompt_template": prompt.template, "prompt_type": prompt.type,
                             "prompt_index": prompt.index, "seed": seed, "video": relative, "sampling": settings,
                             **({"subject_module": origin} if origin else {})})
        if export is not None:
            export.result()
    manifest = out_dir / "manifest.jsonl"
    atomic_write_bytes(manifest, "".join(json.dumps(r) + "\n" for r in rows).encode())
    logger.info("wrote %d videos of %s (%s) to %s", len(rows), subject, method, out_dir)
    return manifest
