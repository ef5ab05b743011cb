"""Load the base model: ``load_base_pipeline("tiny" | hub id | checkpoint file | converted folder)``.

* ``"tiny"``: a small VideoCrafter2-shaped model (the fixtures' ``tiny_lvdm_config.yaml`` sizes, every structural flag
  kept) with seeded random weights, so it is the same model in every process. Built in about a second; for tests and
  demos.
* a converted diffusers folder (``model_index.json``): ``VideoCrafter2Pipeline.from_pretrained``.
* a local original checkpoint (``.ckpt``/``.safetensors``): converted once with ``customcrafter.convert`` and cached
  under ``cache_dir`` (default ``$CUSTOMCRAFTER_CACHE`` or ``~/.cache/customcrafter``), keyed by the file's path,
  size, modification time, a digest of chunks spread over its content, and the converter's version. ``ema=True``
  converts the UNet's EMA weights of a checkpoint trained with EMA instead (a separate cache entry).
* a hub id (``VideoCrafter/VideoCrafter2``, optionally ``repo_id:filename``): the file is fetched with
  ``huggingface_hub.hf_hub_download`` (honours ``HF_HUB_OFFLINE``/the hub cache), then as a local checkpoint.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from customcrafter.models.text import build_text_encoder, load_tokenizer, openclip_text_config
from customcrafter.models.unet import VideoCrafter2UNet
from customcrafter.models.vae import vae_config
from customcrafter.pipeline import VideoCrafter2Pipeline
from customcrafter.scheduler import VideoCrafter2DDIMScheduler
from customcrafter.utils import LOCK_HEARTBEAT_S, LOCK_STALE_AFTER_S, file_lock

logger = logging.getLogger(__name__)

DEFAULT_HUB_MODEL = "VideoCrafter/VideoCrafter2"
DEFAULT_HUB_FILENAME = "model.ckpt"
TINY_SEED = 20240229

#: The tiny preset: the fixtures' tiny_lvdm_config.yaml (UNet model_channels 32, channel_mult [1,2,2,2],
#: num_head_channels 16, context_dim 32; VAE ch 32, ch_mult [1,1,2,2], 1 res block) and tiny_openclip_text.json.
TINY_UNET_CONFIG = {
    "block_out_channels": (32, 64, 64, 64),
    "layers_per_block": 2,
    "cross_attention_dim": 32,
    "attention_head_dim": 16,  # the width of every head (original: num_head_channels)
    "fps_cond": True,
}
TINY_VAE_CONFIG = {"block_out_channels": (32, 32, 64, 64), "layers_per_block": 1}
TINY_TEXT_CONFIG = {"width": 32, "heads": 4, "layers": 3}


def _reinit_zero_weights(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give weights that diffusers initialises to zero (e.g. the temporal convs' last conv) small random values.

    Zero-initialised layers make whole paths of a random model inert; the tiny model should exercise every path.
    """
    for name, param in module.named_parameters():
        if param.ndim >= 2 and not param.detach().any():
            fan_in = param[0].numel()
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * (0.5 / fan_in**0.5))
            logger.debug("tiny preset: re-initialised zero weight %s", name)


def build_tiny_pipeline(seed: int = TINY_SEED) -> VideoCrafter2Pipeline:
    """The tiny model in float32 on the CPU, identical in every process for a given seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = VideoCrafter2UNet(**TINY_UNET_CONFIG)
        vae = AutoencoderKL(**vae_config(**TINY_VAE_CONFIG))
        text_encoder = build_text_encoder(openclip_text_config(**TINY_TEXT_CONFIG))
    generator = torch.Generator().manual_seed(seed + 1)
    for module in (unet, vae, text_encoder):
        _reinit_zero_weights(module, generator)
    return VideoCrafter2Pipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=load_tokenizer(), unet=unet.eval(),
        scheduler=VideoCrafter2DDIMScheduler(),
    )


def base_model_signature(pipe: VideoCrafter2Pipeline) -> str:
    """Stable hash (16 hex digits) of the UNet and text-encoder configs: what an adapter's shapes depend on.

    The vocabulary size is left out: loading a subject module appends token rows, and the base is the same.
    """
    unet_config = {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}
    text = pipe.text_encoder.config
    text_config = {k: getattr(text, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "hidden_act", "layer_norm_eps")}
    blob = json.dumps({"unet": unet_config, "text_encoder": text_config}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$CUSTOMCRAFTER_CACHE`` (converted checkpoints, class images, pipeline checkpoints), else
    ``~/.cache/customcrafter``."""
    return Path(os.environ.get("CUSTOMCRAFTER_CACHE") or Path.home() / ".cache" / "customcrafter")


#: the conversion cache key reads this many evenly spaced chunks of the checkpoint (first and last included)
KEY_SAMPLE_CHUNKS, KEY_SAMPLE_BYTES = 16, 64 * 1024


def _content_sample(path: Path) -> str:
    """A digest of ``KEY_SAMPLE_CHUNKS`` chunks of ``path`` spread over the whole file: ~1 MiB read, not GBs."""
    size, digest = path.stat().st_size, hashlib.sha256()
    step = max(size - KEY_SAMPLE_BYTES, 0) / max(KEY_SAMPLE_CHUNKS - 1, 1)
    with path.open("rb") as fh:
        for offset in sorted({round(i * step) for i in range(KEY_SAMPLE_CHUNKS)}):
            fh.seek(offset)
            digest.update(fh.read(KEY_SAMPLE_BYTES))
    return digest.hexdigest()


def _cache_key(path: Path, ema: bool = False) -> str:
    """The file, the weights chosen (EMA or not) and the converter's version: what the converted folder depends on.

    The file is its path, size and modification time, and a digest of chunks spread over its content: ``cp -p`` or
    ``rsync -t`` give a replacement of the same size the old modification time, but two checkpoints differ
    everywhere. Not the inode or ctime: a ``chmod``, a hard link (DVC's cache) or a volume's ownership pass changes
    those and would convert GBs again for nothing; and not a hash of the whole file, which reads GBs on every load.
    """
    from customcrafter.convert import CONVERTER_VERSION

    stat = path.stat()
    blob = (f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_content_sample(path)}"
            f"|ema={ema}|converter {CONVERTER_VERSION}")
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def converted_checkpoint_dir(checkpoint: str | Path, cache_dir: str | Path | None = None, *, ema: bool = False,
                             lock_heartbeat: float = LOCK_HEARTBEAT_S,
                             lock_stale_after: float = LOCK_STALE_AFTER_S) -> Path:
    """Convert an original checkpoint once (its UNet's EMA weights if ``ema``); return the cached diffusers folder.

    Processes and pods sharing the cache (a ReadWriteMany volume) convert under a lock file beside the folder
    (``utils.file_lock``): one converts, the others wait and then use its folder. A lock whose holder was killed is
    taken over after ``lock_stale_after`` seconds without its heartbeat, and the temporary folders of killed
    conversions (GBs each) are removed before converting.
    """
    from customcrafter.convert import OutputWriteError, check_writable

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
    root = Path(cache_dir or default_cache_dir())
    name = f"{checkpoint.stem}{'-ema' if ema else ''}-{_cache_key(checkpoint, ema)}"
    target = root / "converted" / name
    if (target / "model_index.json").is_file():
        logger.info("using converted %s from the cache: %s", checkpoint, target)
        return target
    try:
        check_writable(target.parent, target)  # a read-only cache fails here, before the lock file
        with file_lock(target.with_name(f".{target.name}.lock"), lock_heartbeat, lock_stale_after):
            _convert_locked(checkpoint, target, ema)
    except OutputWriteError as exc:
        raise OutputWriteError(f"{exc}; the conversion cache is {root}: set CUSTOMCRAFTER_CACHE (or cache_dir) to a "
                               "writable folder with room, or convert once with `customcrafter convert` and pass "
                               "the folder") from exc
    return target


def _convert_locked(checkpoint: Path, target: Path, ema: bool) -> None:
    """With the target's lock held: use the folder a process that held it before wrote, or remove what killed
    conversions left (atomic_dir's ``.<name>.*.tmp``; no live one writes while we hold the lock) and convert."""
    from customcrafter.convert import convert_checkpoint

    if (target / "model_index.json").is_file():
        logger.info("another process converted %s meanwhile; using its folder %s", checkpoint, target)
        return
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        logger.info("removing %s, left by a conversion that was killed", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    logger.info("converting %s (once; cached at %s)", checkpoint, target)
    try:
        convert_checkpoint(checkpoint, target, ema=ema)
    except FileExistsError:  # written by a process that took no lock (an older version sharing the volume)
        if not (target / "model_index.json").is_file():
            raise
        logger.info("another process converted %s meanwhile; using its folder %s", checkpoint, target)


def _download(model: str) -> Path:
    """``repo_id`` or ``repo_id:filename`` → local file via the hub cache; clear error when offline and not cached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, filename = model.partition(":")
    filename = filename or DEFAULT_HUB_FILENAME
    token_hint = "set HF_TOKEN or run `hf auth login`"
    try:
        return Path(hf_hub_download(repo_id, filename))
    except LocalEntryNotFoundError as exc:
        raise FileNotFoundError(
            f"{model}: not in the local hub cache and the hub is unreachable (offline: HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', '0')}); download {filename} once with network "
            "access, or pass a local checkpoint/converted folder"
        ) from exc
    # the hub's own messages span several lines and do not say which of our inputs was wrong
    except GatedRepoError as exc:
        raise PermissionError(f"{repo_id}: a gated model repository; accept its terms on the hub with an account "
                              f"that has access, and {token_hint}") from exc
    except RepositoryNotFoundError as exc:
        raise FileNotFoundError(f"{repo_id}: no such model repository on the hub, and no local file or folder "
                                f"{model!r} (a typo? a private repository needs a token: {token_hint})") from exc
    except RevisionNotFoundError as exc:
        raise FileNotFoundError(f"{repo_id}: revision not found on the hub") from exc
    except EntryNotFoundError as exc:
        raise FileNotFoundError(f"{repo_id}: the repository has no file {filename!r} (name it as "
                                f"{repo_id}:<file>)") from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        reason = f"{token_hint} (HTTP {status})" if status in (401, 403) else str(exc).splitlines()[0]
        raise OSError(f"{model}: could not download {filename} from the hub: {reason}") from exc


def resolve_base_model(model: str, cache_dir: str | Path | None = None, *, ema: bool = False) -> str | Path:
    """``"tiny"``, or the converted diffusers folder that ``model`` names or becomes (a hub file is downloaded and a
    checkpoint converted, once: both are cached; ``ema``: its UNet's EMA weights). Training launchers call it before
    starting their processes, so that one process converts rather than each of them."""
    path = Path(model)
    if ema and (model == "tiny" or path.is_dir()):
        raise ValueError(f"{model}: ema chooses the weights when a checkpoint is converted; this is not a checkpoint "
                         "(convert the original with `customcrafter convert --ema` and pass that folder)")
    if model == "tiny":
        return model
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path}: not a converted model folder (no model_index.json)")
        return path
    if path.is_file():
        return converted_checkpoint_dir(path, cache_dir, ema=ema)
    if ":" in model and "/" in model.partition(":")[0]:  # repo_id:filename (its .ckpt suffix is not a local file)
        return converted_checkpoint_dir(_download(model), cache_dir, ema=ema)
    if path.suffix in (".ckpt", ".safetensors", ".pt", ".pth"):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if _is_repo_id(model):  # owner/name: a hub id (a local path of that form was not found above)
        return converted_checkpoint_dir(_download(model), cache_dir, ema=ema)
    if "/" in model or os.sep in model:  # a local path with a typo, not a hub id: say so, not the hub's syntax rules
        raise FileNotFoundError(f"{model}: no such file or folder (nor a hub id of the form owner/name)")
    raise FileNotFoundError(f"{model}: not 'tiny', a hub id, a checkpoint file or a converted folder")


def _is_repo_id(model: str) -> bool:
    """``owner/name`` as the hub accepts it (not ``/abs/path``, ``./rel``, ``a/b/c``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if model.count("/") != 1:
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def load_base_tokenizer(model: str = "tiny"):
    """The tokenizer ``load_base_pipeline(model)`` will have, without loading (or downloading, or converting) any
    weights: a converted folder's ``tokenizer/``, else the packaged one (what conversion writes into every folder).
    For checks that need the tokenizer alone before minutes of loading (training's placeholder token)."""
    from transformers import CLIPTokenizer

    folder = Path(model) / "tokenizer"
    if model != "tiny" and (Path(model) / "model_index.json").is_file() and folder.is_dir():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    return load_tokenizer()


def load_base_pipeline(
    model: str = "tiny",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    ema: bool = False,
) -> VideoCrafter2Pipeline:
    """Load the base model (see the module docstring for what ``model`` may be) on ``device`` (None: CPU); ``ema``:
    a checkpoint's UNet EMA weights."""
    source = resolve_base_model(model, cache_dir, ema=ema)
    pipe = build_tiny_pipeline() if source == "tiny" else VideoCrafter2Pipeline.from_pretrained(source)
    pipe.base_model_id = model
    # Inference weights: frozen, eval mode. (Also numerics: on CPU, F.linear folds 3D inputs differently when the
    # weight requires grad, so a frozen and an unfrozen copy of the same model differ in the last bits.)
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):
        if component is not None:  # a folder converted with only some components
            component.requires_grad_(False).eval()
    pipe = pipe.to(device or "cpu")
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
