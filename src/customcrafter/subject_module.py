"""A trained subject module on disk, and loading it onto a base pipeline in one call.

Folder layout (every method)::

    module.json                 method, base_model_id, base_model_signature, subject, class_word, token, kind,
                                fps, dwvss defaults (CustomCrafter), the resolved training config
    token_embeddings.safetensors  {token: embedding row}
    tokenizer_added.json        {"tokens": ["<new1>"], "init": ...}
    losses.json                 the training loss of every step (written by the trainer, in the same atomic write)
    + the method's weights:
      customcrafter      adapter_config.json + adapter_model.safetensors (stock peft layout; keys
                         "base_model.model.<module>.lora_A.weight")
      custom_diffusion*  deltas.safetensors (W - W0 of the spatial attn2.to_k / to_v)
      dreamvideo*        identity_adapter.safetensors + identity_adapter.json

Several modules can be loaded together; a module whose token is already taken (two modules trained as ``<new1>``)
gets the next free ``<newK>``, returned in :attr:`LoadedModule.token_mapping`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from customcrafter.utils import atomic_dir

__all__ = ["LoadedModule", "save_subject_module", "load_subject_module", "read_module_meta", "loaded_modules",
           "resolve_module_dir", "MODULE_FILE", "LOSSES_FILE", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

MODULE_FILE = "module.json"
#: The per-step training losses, inside the module folder (so they are always the module's own).
LOSSES_FILE = "losses.json"
FORMAT_VERSION = 1
#: Where the trainer writes the module inside its output folder (checkpoints sit beside it).
MODULE_SUBDIR = "subject_module"


@dataclass
class LoadedModule:
    """What :func:`load_subject_module` did: the adapter name, the token used in prompts, and the module's info."""

    module_dir: Path
    method: str
    adapter_name: str
    token: str
    class_word: str
    fps: int
    uses_lora: bool
    meta: dict = field(repr=False)
    token_mapping: dict[str, str] = field(default_factory=dict)  # saved token -> token in this pipeline


def loaded_modules(pipe) -> list[LoadedModule]:
    """The subject modules loaded onto ``pipe``, in load order."""
    return pipe.__dict__.setdefault("_subject_modules", [])


def resolve_module_dir(path: str | Path) -> Path:
    """A module folder, or a training output folder holding ``subject_module/``."""
    path = Path(path)
    if (path / MODULE_FILE).is_file():
        return path
    if (path / MODULE_SUBDIR / MODULE_FILE).is_file():
        return path / MODULE_SUBDIR
    if not path.exists():
        raise FileNotFoundError(f"{path}: subject module folder not found")
    raise ValueError(f"{path}: not a subject module (no {MODULE_FILE})")


def read_module_meta(module_dir: str | Path) -> dict:
    module_dir = resolve_module_dir(module_dir)
    try:
        meta = json.loads((module_dir / MODULE_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{module_dir / MODULE_FILE}: not valid JSON ({exc})") from None
    for key in ("method", "base_model_signature", "token", "class_word", "fps"):
        if key not in meta:
            raise ValueError(f"{module_dir / MODULE_FILE}: missing {key!r}")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{module_dir / MODULE_FILE}: format_version {version!r} is newer than this customcrafter "
                         f"reads ({FORMAT_VERSION}); upgrade customcrafter to load this module")
    return meta


def save_subject_module(module_dir: str | Path, *, method, pipe, subject, config, token_id: int,
                        schedule: dict | None = None, losses: list[float] | None = None) -> Path:
    """Write the module atomically (a half-written module never exists). ``losses`` (the per-step training losses)
    go into the same folder write as ``losses.json``: a separate file beside it could be another run's."""
    from customcrafter.dwvss import DWVSSConfig
    from customcrafter.loading import base_model_signature
    from customcrafter.training.tokens import RARE_INIT_TOKEN, token_rows

    module_dir = Path(module_dir)
    with atomic_dir(module_dir, overwrite=True) as tmp:
        files = method.save(tmp)
        row = token_rows(pipe.text_encoder, [token_id])[0].to("cpu", torch.float32).contiguous()
        save_file({subject.token: row}, str(tmp / "token_embeddings.safetensors"), metadata={"format": "pt"})
        (tmp / "tokenizer_added.json").write_text(json.dumps(
            {"tokens": [subject.token], "init": {"from": RARE_INIT_TOKEN if config.token_init == "rare" else
                                                 subject.class_word, "mode": config.token_init}}, indent=2))
        meta = {
            "format_version": FORMAT_VERSION,
            "method": config.method,
            "base_model_id": getattr(pipe, "base_model_id", config.base_model),
            "base_model_signature": base_model_signature(pipe),
            "subject": subject.name,
            "class_word": subject.class_word,
            "token": subject.token,
            "kind": subject.kind,
            "fps": config.fps,
            "uses_lora": method.uses_lora,
            "dwvss": DWVSSConfig().model_dump() if method.uses_lora else None,
            "weights": files,
            "train_config": config.model_dump(mode="json"),
            "train_schedule": schedule or {},  # processes, global batch, each stage's steps and resolved lr
        }
        if losses is not None:
            (tmp / LOSSES_FILE).write_text(json.dumps(losses))
        (tmp / MODULE_FILE).write_text(json.dumps(meta, indent=2))
    logger.info("wrote subject module %s (%s)", module_dir, config.method)
    return module_dir


def _next_free_token(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    index = 1
    while f"<new{index}>" in vocab:
        index += 1
    return f"<new{index}>"


def _unique_adapter_name(pipe, wanted: str | None, meta: dict) -> str:
    taken = {m.adapter_name for m in loaded_modules(pipe)} | set(getattr(pipe.unet, "peft_config", {}) or {})
    if wanted:
        if wanted in taken:
            raise ValueError(f"adapter name {wanted!r} is already used on this pipeline")
        return wanted
    stem = re.sub(r"[^a-zA-Z0-9_]", "_", f"{meta.get('subject') or 'subject'}")
    name, index = stem, 2
    while name in taken:
        name, index = f"{stem}_{index}", index + 1
    return name


def load_subject_module(pipe, module_dir: str | Path, adapter_name: str | None = None,
                        weight: float = 1.0) -> LoadedModule:
    """Load a subject module onto ``pipe``: the method's weights, then the token + its embedding row (so a module
    whose weights do not fit adds no token).

    Raises ValueError naming both base models when the module was trained on a different base. ``weight`` is the
    LoRA adapter scale (CustomCrafter; DWVSS multiplies its schedule by it).
    """
    from customcrafter.loading import base_model_signature
    from customcrafter.training.methods import method_class
    from customcrafter.training.tokens import add_placeholder_token

    module_dir = resolve_module_dir(module_dir)
    meta = read_module_meta(module_dir)
    signature = base_model_signature(pipe)
    if meta["base_model_signature"] != signature:
        raise ValueError(
            f"{module_dir}: trained on base model {meta.get('base_model_id')!r} (signature "
            f"{meta['base_model_signature'][:12]}), but the pipeline is {getattr(pipe, 'base_model_id', '?')!r} "
            f"(signature {signature[:12]}); load the module onto the base it was trained on")
    trained_on, base = meta.get("base_model_id"), getattr(pipe, "base_model_id", None)
    if trained_on and base and str(trained_on) != str(base):  # same architecture: the signature cannot tell weights
        logger.warning("%s: trained on base model %r, loaded onto %r (same architecture); unless both are the same "
                       "weights, the subject will not come out as trained", module_dir, trained_on, base)
    cls = method_class(meta["method"])
    _check_weight_files(module_dir, meta)
    rows = load_file(str(module_dir / "token_embeddings.safetensors"))
    saved_token = meta["token"]
    if saved_token not in rows:
        raise ValueError(f"{module_dir / 'token_embeddings.safetensors'}: no row for token {saved_token!r}")
    token = saved_token
    if token in pipe.tokenizer.get_vocab():
        token = _next_free_token(pipe.tokenizer)
        logger.info("token %s is taken on this pipeline; %s uses %s", saved_token, module_dir, token)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if rows[saved_token].shape != (width,):
        raise ValueError(f"{module_dir / 'token_embeddings.safetensors'}: row of {saved_token!r} has shape "
                         f"{tuple(rows[saved_token].shape)}, but this text encoder's embeddings have width {width}")
    name = _unique_adapter_name(pipe, adapter_name, meta)
    # weights first, the token after: a module whose weights do not fit leaves no token behind
    cls.load(pipe, module_dir, name, meta)
    add_placeholder_token(pipe.tokenizer, pipe.text_encoder, token, meta["class_word"],
                          init_vector=rows[saved_token])
    loaded = LoadedModule(module_dir=module_dir, method=meta["method"], adapter_name=name, token=token,
                          class_word=meta["class_word"], fps=int(meta["fps"]), uses_lora=cls.uses_lora, meta=meta,
                          token_mapping={saved_token: token})
    loaded_modules(pipe).append(loaded)
    if cls.uses_lora:
        _activate_lora_adapters(pipe, {name: weight})
    return loaded


def _check_weight_files(module_dir: Path, meta: dict) -> None:
    """Every safetensors file of the module is there and whole (its header read; an interrupted copy fails here), before
    anything is loaded: safetensors' own errors name no file."""
    from safetensors import safe_open

    weights = meta.get("weights")
    files = weights.get("files", []) if isinstance(weights, dict) else []
    for name in ["token_embeddings.safetensors", *(f for f in files if str(f).endswith(".safetensors"))]:
        path = module_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the subject module")
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a bad file
            raise ValueError(f"{path}: not a readable safetensors file ({exc}); the module folder is damaged "
                             "(an interrupted copy or download?)") from None


def _activate_lora_adapters(pipe, new_weights: dict[str, float]) -> None:
    """Make every loaded LoRA module active together (diffusers' add_adapter activates only the newest)."""
    weights = pipe.__dict__.setdefault("_subject_lora_weights", {})
    weights.update(new_weights)
    names = [m.adapter_name for m in loaded_modules(pipe) if m.uses_lora]
    pipe.unet.set_adapters(names, weights=[weights[n] for n in names])
