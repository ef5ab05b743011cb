"""Original VideoCrafter2 checkpoint → diffusers folder loadable by ``VideoCrafter2Pipeline.from_pretrained``.

Every parameter of our models gets its source named explicitly: for each diffusers key a rule gives the original key,
the shape the original tensor must have and how to transform it (rename; drop the trailing 1 of Conv1d/1×1 conv
kernels used as linear layers; split OpenCLIP's fused ``in_proj``). The checkpoint is then checked against that plan
before anything is written: a missing, unexpected or mis-shaped key is an error naming the key.

Original prefixes: ``model.diffusion_model.`` (UNet), ``first_stage_model.`` (VAE), ``cond_stage_model.model.``
(OpenCLIP text tower). Keys that are consumed but not needed: OpenCLIP's last block (VideoCrafter2 uses the
penultimate layer), ``text_projection``, ``logit_scale``, and LatentDiffusion's noise-schedule buffers.

EMA (``ema``): training with EMA (LitEma) also saves the averaged UNet weights as ``model_ema.<name without dots>``
plus ``model_ema.decay``/``num_updates``. By default they are skipped (an info log counts them); with ``ema`` they
replace the trained UNet weights, and every UNet parameter must have its averaged copy.

Partial conversion (``components``): only the selected components are converted; ``tokenizer/`` (packaged) and
``scheduler/`` are always written. ``model_index.json`` lists a component that was not converted as ``[null, null]``:
``VideoCrafter2Pipeline.from_pretrained(folder)`` then loads it as None (``text_encoder`` and ``vae`` are optional
components), or ``from_pretrained(folder, text_encoder=...)`` supplies it. A folder of the text encoder alone is read
with ``CLIPTextModel.from_pretrained(folder / "text_encoder")``.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL
from safetensors import SafetensorError

from customcrafter.models.text import VIT_H_14_TEXT, build_text_encoder, load_tokenizer, openclip_text_config
from customcrafter.models.unet import VideoCrafter2UNet
from customcrafter.models.vae import vae_config
from customcrafter.scheduler import VideoCrafter2DDIMScheduler
from customcrafter.utils import atomic_dir

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder")
#: Bump whenever the folder written for the same checkpoint changes (a mapping fix, a new file, other defaults): it is
#: part of the conversion cache's key (loading.converted_checkpoint_dir), so folders of an older converter are not
#: reused, and it is recorded in model_index.json.
CONVERTER_VERSION = 1
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.model."}
#: LatentDiffusion's registered buffers (recomputed by the scheduler): never converted.
IGNORED_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "scale_arr", "logvar",
    "scale_factor",
}
#: Checkpoints of training with EMA (LitEma) hold the averaged UNet weights under this prefix, with its bookkeeping.
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = {"model_ema.decay", "model_ema.num_updates"}


class ConversionError(ValueError):
    """The checkpoint or config does not fit: the message names the file, key or field."""


class OutputWriteError(OSError):
    """The converted folder could not be written (read-only or full disk, no permission): names the folder."""


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Source:
    """Where a diffusers parameter comes from: original key, its expected shape, and the transform to apply."""

    key: str
    shape: tuple[int, ...]
    transform: Callable[[torch.Tensor], torch.Tensor] = _identity


@dataclass
class Plan:
    """A component's key plan: diffusers key → Source, and original keys accepted but dropped."""

    sources: dict[str, Source]
    dropped: set[str] = field(default_factory=set)

    def original_keys(self) -> set[str]:
        return {s.key for s in self.sources.values()} | self.dropped


def _squeeze_to(shape: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.reshape(shape)


# ----------------------------------------------------------------------------------------------------------------- UNet
_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(name: str) -> str:
    part, rest = name.split(".", 1)
    return f"{_RESNET_NAMES[part]}.{rest}"


def _unet_original_key(key: str, layers: int, attention_levels: set[int]) -> str:
    """Diffusers UNet key → original ``openaimodel3d.UNetModel`` key (without prefix)."""
    n = layers + 1  # original blocks per level: `layers` res blocks + 1 down/upsample (or extra up res block)
    simple = [(r"time_embedding\.linear_1\.", "time_embed.0."), (r"time_embedding\.linear_2\.", "time_embed.2."),
              (r"fps_embedding\.linear_1\.", "fps_embedding.0."), (r"fps_embedding\.linear_2\.", "fps_embedding.2."),
              (r"conv_in\.", "input_blocks.0.0."), (r"transformer_in\.", "init_attn.0."),
              (r"conv_norm_out\.", "out.0."), (r"conv_out\.", "out.2.")]
    for pattern, repl in simple:
        if re.match(pattern, key):
            return re.sub("^" + pattern, repl, key)
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|temp_convs|attentions|temp_attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return _layer_key(f"input_blocks.{1 + n * level + j}", kind, rest)
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{n * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|temp_convs|attentions|temp_attentions)\.(\d+)\.(.+)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        index = {"resnets": 3 * j, "temp_convs": 3 * j, "attentions": 1, "temp_attentions": 2}[kind]
        return _layer_key("middle_block", kind, rest, index)
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|temp_convs|attentions|temp_attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return _layer_key(f"output_blocks.{n * level + j}", kind, rest)
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        position = 3 if level in attention_levels else 1  # after the transformers, if the level has them
        return f"output_blocks.{n * level + layers}.{position}.conv.{m[2]}"
    raise ConversionError(f"no original key known for diffusers UNet parameter {key}")


def _layer_key(block: str, kind: str, rest: str, index: int = 0) -> str:
    """Original key of a layer of an input/output block (sub-index 0 res block, 1 spatial, 2 temporal transformer)
    or of the middle block (0/3 res blocks, 1 spatial, 2 temporal transformer)."""
    base = f"{block}.{index}" if block == "middle_block" else f"{block}.0"
    if kind == "resnets":
        return f"{base}.{_resnet(rest)}"
    if kind == "temp_convs":
        return f"{base}.temopral_conv.{rest}"  # (sic): the original's spelling
    return f"{block}.{1 if kind == 'attentions' else 2}.{rest}"


def plan_unet(unet: VideoCrafter2UNet) -> Plan:
    """Key plan for ``unet`` (real or on the meta device)."""
    layers = unet.config.layers_per_block
    up_attention = {i for i, t in enumerate(unet.config.up_block_types) if t.startswith("CrossAttn")}
    sources = {}
    for key, param in unet.state_dict().items():
        original = PREFIXES["unet"] + _unet_original_key(key, layers, up_attention)
        shape = tuple(param.shape)
        if re.match(r"transformer_in\.proj_(in|out)\.weight", key):  # Conv1d kernels (out, in, 1) used as Linear
            sources[key] = Source(original, shape + (1,), _squeeze_to(shape))
        else:
            sources[key] = Source(original, shape)
    return Plan(sources)


# ------------------------------------------------------------------------------------------------------------------ VAE
def _vae_original_key(key: str, num_levels: int) -> str:
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                 lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.",
                 lambda m: f"{m[1]}.mid.attn_1.", key)
    for ours, theirs in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        key = key.replace(f"mid.attn_1.{ours}.", f"mid.attn_1.{theirs}.")
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    # the decoder's up levels are numbered from the bottom in the original
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                 lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.", key)
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def plan_vae(vae: AutoencoderKL) -> Plan:
    num_levels = len(vae.config.block_out_channels)
    sources = {}
    for key, param in vae.state_dict().items():
        original = PREFIXES["vae"] + _vae_original_key(key, num_levels)
        shape = tuple(param.shape)
        if re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key):  # 1×1 conv → Linear
            sources[key] = Source(original, shape + (1, 1), _squeeze_to(shape))
        else:
            sources[key] = Source(original, shape)
    return Plan(sources)


# ----------------------------------------------------------------------------------------------------- text encoder
def plan_text_encoder(text_encoder: torch.nn.Module, tower_layers: int) -> Plan:
    """OpenCLIP text tower (``tower_layers`` blocks) → CLIPTextModel cut after the penultimate block."""
    p = PREFIXES["text_encoder"]
    width = text_encoder.config.hidden_size
    sources = {}
    for key, param in text_encoder.state_dict().items():
        shape = tuple(param.shape)
        name = key.removeprefix("text_model.")  # transformers < 5 nests the modules under text_model
        if name == "embeddings.token_embedding.weight":
            sources[key] = Source(p + "token_embedding.weight", shape)
        elif name == "embeddings.position_embedding.weight":
            sources[key] = Source(p + "positional_embedding", shape)
        elif name.startswith("final_layer_norm."):
            sources[key] = Source(p + "ln_final." + key.rsplit(".", 1)[1], shape)
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)", name):
            block, rest = f"{p}transformer.resblocks.{m[1]}.", m[2]
            if qkv := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                part = "qkv".index(qkv[1])
                fused = (3 * width,) + shape[1:]
                sources[key] = Source(f"{block}attn.in_proj_{qkv[2]}", fused,
                                      lambda t, part=part: t[part * width:(part + 1) * width])
            else:
                for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                    if rest.startswith(ours + "."):
                        sources[key] = Source(block + theirs + rest[len(ours):], shape)
                        break
                else:
                    raise ConversionError(f"no original key known for text encoder parameter {key}")
        elif name == "embeddings.position_ids":
            continue  # a buffer, not a weight
        else:
            raise ConversionError(f"no original key known for text encoder parameter {key}")
    # The last block(s) after the cut, and the projection to the joint space, are not used by VideoCrafter2.
    used_blocks = text_encoder.config.num_hidden_layers
    dropped = {p + "text_projection", p + "logit_scale"}
    block_keys = {s.key.split(".resblocks.", 1)[1].split(".", 1)[1]
                  for s in sources.values() if ".resblocks.0." in s.key}
    dropped |= {f"{p}transformer.resblocks.{i}.{k}" for i in range(used_blocks, tower_layers) for k in block_keys}
    return Plan(sources, dropped)


# -------------------------------------------------------------------------------------------------------------- configs
#: Structural options of openaimodel3d.UNetModel that this port implements, with the only value it supports.
_UNET_FIXED = {"use_linear": True, "temporal_conv": True, "temporal_attention": True, "temporal_selfatt_only": True,
               "use_relative_position": False, "use_causal_attention": False, "addition_attention": True,
               "transformer_depth": 1, "use_scale_shift_norm": False, "resblock_updown": False, "dims": 2,
               "conv_resample": True, "image_cross_attention": False}


def unet_config_from_original(params: dict, source: str = "config") -> dict:
    """``unet_config.params`` of an original YAML → ``VideoCrafter2UNet`` config."""
    for name, supported in _UNET_FIXED.items():
        if name in params and params[name] != supported:
            raise ConversionError(f"{source}: unet_config.params.{name}={params[name]!r} is not supported "
                                  f"(VideoCrafter2 uses {supported!r})")
    try:
        channels = int(params["model_channels"])
        mult = list(params["channel_mult"])
        head_channels = int(params.get("num_head_channels", -1))
        attention_resolutions = set(params["attention_resolutions"])
        layers = int(params["num_res_blocks"])
        context_dim = int(params["context_dim"])
    except KeyError as exc:
        raise ConversionError(f"{source}: unet_config.params.{exc.args[0]} is missing") from None
    if head_channels <= 0:
        raise ConversionError(f"{source}: unet_config.params.num_head_channels must be set (VideoCrafter2: 64); "
                              "a fixed num_heads is not supported")
    attention = [2**level in attention_resolutions for level in range(len(mult))]
    if not attention[0] or attention[-1] or any(a < b for a, b in zip(attention, attention[1:], strict=False)):
        raise ConversionError(f"{source}: attention_resolutions {sorted(attention_resolutions)} with {len(mult)} levels:"
                              " only attention on every level but the deepest is supported (as VideoCrafter2)")
    return {
        "in_channels": int(params.get("in_channels", 4)),
        "out_channels": int(params.get("out_channels", 4)),
        "block_out_channels": tuple(channels * m for m in mult),
        "down_block_types": tuple("CrossAttnDownBlock3D" if a else "DownBlock3D" for a in attention),
        "up_block_types": tuple("CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(attention)),
        "layers_per_block": layers,
        "cross_attention_dim": context_dim,
        "attention_head_dim": head_channels,
        "fps_cond": bool(params.get("fps_cond", False)),
    }


def vae_config_from_original(ddconfig: dict, source: str = "config") -> dict:
    """``first_stage_config.params.ddconfig`` → ``AutoencoderKL`` config."""
    if ddconfig.get("attn_resolutions"):
        raise ConversionError(f"{source}: first_stage_config ddconfig.attn_resolutions={ddconfig['attn_resolutions']} "
                              "is not supported (VideoCrafter2: [])")
    try:
        return vae_config(block_out_channels=tuple(int(ddconfig["ch"]) * m for m in ddconfig["ch_mult"]),
                          layers_per_block=int(ddconfig["num_res_blocks"]),
                          latent_channels=int(ddconfig.get("z_channels", 4)))
    except KeyError as exc:
        raise ConversionError(f"{source}: first_stage_config.params.ddconfig.{exc.args[0]} is missing") from None


def scheduler_config_from_original(params: dict) -> dict:
    return {"num_train_timesteps": int(params.get("timesteps", 1000)),
            "beta_start": float(params.get("linear_start", 0.00085)),
            "beta_end": float(params.get("linear_end", 0.012)),
            "use_scale": bool(params.get("use_scale", True)), "scale_b": float(params.get("scale_b", 0.7))}


@dataclass
class ModelConfigs:
    unet: dict
    vae: dict
    text: dict  # OpenCLIP tower size: width, heads, layers, vocab_size, context_length
    scheduler: dict


def read_configs(config: str | Path | None = None, text_config: str | Path | None = None) -> ModelConfigs:
    """Sizes from an original YAML (``model:`` root or bare) and a text-tower JSON; full-size defaults otherwise."""
    import yaml

    if config is None:
        unet, vae, scheduler = {"fps_cond": True}, vae_config(), {}
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConversionError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        data = data.get("model", data) if isinstance(data, dict) else None
        params = data.get("params") if isinstance(data, dict) else None
        if not isinstance(params, dict) or "unet_config" not in params:
            raise ConversionError(f"{path}: no (model.)params.unet_config: not a VideoCrafter2 config")
        unet = unet_config_from_original(params["unet_config"].get("params", {}), str(path))
        vae = vae_config_from_original(params.get("first_stage_config", {}).get("params", {}).get("ddconfig", {}),
                                       str(path)) if "first_stage_config" in params else vae_config()
        scheduler = scheduler_config_from_original(params)
    text = dict(VIT_H_14_TEXT)
    if text_config is not None:
        path = Path(text_config)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: text config not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{path}: not valid JSON ({exc})") from None
        cfg = data.get("text_cfg", data)
        unknown = set(cfg) - set(text)
        if unknown:
            raise ConversionError(f"{path}: unknown text tower field(s) {sorted(unknown)}; expected {sorted(text)}")
        text.update({k: int(v) for k, v in cfg.items()})
    return ModelConfigs(unet=unet, vae=vae, text=text, scheduler=scheduler)


# --------------------------------------------------------------------------------------------------------- conversion
def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors or a legacy pickle (``torch.load(weights_only=True)``, its ``state_dict`` if nested), told apart by
    the file's first bytes rather than its name (a safetensors file saved as ``model.ckpt`` and the reverse happen)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    with open(path, "rb") as fh:
        head = fh.read(9)
    pickled = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch's zip layout, or a bare pickle
    if head[8:9] == b"{" or (path.suffix == ".safetensors" and not pickled):  # 8-byte header size, JSON header
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        data = _load_weights_only(path, mmap=True)
    except Exception:  # noqa: BLE001 - retry without mmap (old zip layouts), then report
        try:
            data = _load_weights_only(path, mmap=False)
        except Exception as exc:  # noqa: BLE001
            message = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch's weights-only message has bold escapes
            unpickler = re.search(r"WeightsUnpickler error: ([^\n]*)", message)
            reason = unpickler[1] if unpickler else next((line for line in message.splitlines() if line.strip()),
                                                         type(exc).__name__)
            raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConversionError(f"{path}: no state_dict of tensors inside")
    return data


class _NotLoaded:
    """Stands in for an object of a training checkpoint other than tensors (hyper-parameters, callback or optimiser
    state of a Lightning ``.ckpt``): built from nothing, runs no code of the file, and is never used."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def _load_weights_only(path: Path, mmap: bool) -> object:
    """``torch.load(weights_only=True)``; a class it does not allow (outside ``torch``) is read as a
    :class:`_NotLoaded` instead of failing the whole file: only the ``state_dict`` of tensors is used."""
    stand_ins: list[str] = []
    while True:
        with torch.serialization.safe_globals([(_NotLoaded, name) for name in stand_ins]):
            try:
                if mmap:  # needs the path
                    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                else:  # a file object: torch.load sends a path named *.safetensors to safetensors, whatever it holds
                    with open(path, "rb") as fh:
                        data = torch.load(fh, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                found = re.search(r"Unsupported global: GLOBAL ([\w.]+) was not", str(exc))
                if not found or found[1] in stand_ins or found[1].startswith("torch.") or len(stand_ins) >= 100:
                    raise
                stand_ins.append(found[1])
                continue
        if stand_ins:
            logger.info("%s: skipped objects other than tensors (%s)", path, ", ".join(stand_ins))
        return data


def build_empty_models(configs: ModelConfigs, components: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """The target models with parameters on the meta device (no memory for weights)."""
    models = {}
    with init_empty_weights():
        if "unet" in components:
            models["unet"] = VideoCrafter2UNet(**configs.unet)
        if "vae" in components:
            models["vae"] = AutoencoderKL(**configs.vae)
        if "text_encoder" in components:
            models["text_encoder"] = build_text_encoder(openclip_text_config(**configs.text))
    return models


def make_plans(models: dict[str, torch.nn.Module], configs: ModelConfigs) -> dict[str, Plan]:
    builders = {"unet": plan_unet, "vae": plan_vae,
                "text_encoder": lambda m: plan_text_encoder(m, configs.text["layers"])}
    return {name: builders[name](model) for name, model in models.items()}


def _list(keys: list[str], limit: int = 3) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(sorted(keys)[:limit]) + more


def check_state_dict(shapes: dict[str, tuple[int, ...]], plans: dict[str, Plan], source: str = "checkpoint") -> None:
    """Every planned key present with its shape; no key of a converted component (or unknown prefix) left over."""
    for name, plan in plans.items():
        if not any(k.startswith(PREFIXES[name]) for k in shapes):
            raise ConversionError(f"{source}: no {name} weights ({PREFIXES[name]}*) in the checkpoint; "
                                  f"choose the parts it has with --components")
        missing = sorted({s.key for s in plan.sources.values()} - set(shapes))
        if missing:
            raise ConversionError(f"{source}: missing {name} key(s): {_list(missing)} "
                                  "(a truncated checkpoint, or --config/--text-config does not match the weights)")
        for src in plan.sources.values():
            if tuple(shapes[src.key]) != src.shape:
                raise ConversionError(f"{source}: {src.key} has shape {list(shapes[src.key])}, the config expects "
                                      f"{list(src.shape)} (does --config/--text-config match the weights?)")
        extra = sorted(k for k in shapes if k.startswith(PREFIXES[name]) and k not in plan.original_keys())
        if extra:
            raise ConversionError(f"{source}: unexpected {name} key(s): {_list(extra)}")
    unknown = sorted(k for k in shapes if k not in IGNORED_KEYS and not k.startswith(tuple(PREFIXES.values())))
    if unknown:
        raise ConversionError(f"{source}: unexpected key(s) outside {sorted(PREFIXES.values())}: {_list(unknown)}")


def ema_key(original: str) -> str:
    """LitEma's name for the averaged copy of the UNet weight ``original`` (``model.diffusion_model.out.2.weight``):
    LitEma averages LatentDiffusion's ``model`` and registers each parameter as a buffer named without its dots
    (buffer names cannot hold them): ``model_ema.diffusion_modelout2weight``."""
    return EMA_PREFIX + original.removeprefix("model.").replace(".", "")


def select_weights(state_dict: dict[str, torch.Tensor], plans: dict[str, Plan], ema: bool,
                   source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """``state_dict`` without the EMA keys, its UNet weights replaced by their averaged copies if ``ema``."""
    ema_keys = {k for k in state_dict if k.startswith(EMA_PREFIX)}
    averaged = ema_keys - EMA_BOOKKEEPING
    weights = {k: v for k, v in state_dict.items() if k not in ema_keys}
    if not ema:
        if averaged:
            logger.info("%s: skipped %d EMA weight(s) (model_ema.*); converting the trained weights (--ema converts "
                        "the averaged ones)", source, len(averaged))
        return weights
    if not averaged:
        raise ConversionError(f"{source}: no EMA weights (model_ema.*) in the checkpoint; convert without --ema")
    wanted = {src.key: ema_key(src.key) for src in plans["unet"].sources.values()}
    missing = sorted(k for k, e in wanted.items() if e not in state_dict)
    if missing:
        raise ConversionError(f"{source}: the EMA weights lack {len(missing)} UNet parameter(s): {_list(missing)} "
                              "(looked for as model_ema.<name without dots>); convert without --ema")
    extra = sorted(averaged - set(wanted.values()))
    if extra:
        raise ConversionError(f"{source}: unexpected EMA key(s): {_list(extra)}")
    logger.info("%s: converting the UNet's EMA weights (%d tensors)", source, len(wanted))
    return weights | {k: state_dict[e] for k, e in wanted.items()}


def _materialise(model: torch.nn.Module, plan: Plan, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    converted = {k: src.transform(state_dict[src.key]).to(torch.float32).contiguous() for k, src in plan.sources.items()}
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:  # a bug in the plan, not in the user's input
        raise RuntimeError(f"conversion plan out of date: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def convert_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    config: str | Path | None = None,
    text_config: str | Path | None = None,
    components: tuple[str, ...] | list[str] = COMPONENTS,
    overwrite: bool = False,
    ema: bool = False,
) -> Path:
    """Convert ``checkpoint`` into a diffusers folder at ``output`` (written atomically: all or nothing).

    A checkpoint of training with EMA holds the UNet twice; ``ema`` converts the averaged copy (``model_ema.*``)
    instead of the trained weights (``model.*``). The VAE and text encoder are not averaged.
    """
    components = tuple(components)
    bad = [c for c in components if c not in COMPONENTS]
    if bad or not components:
        raise ConversionError(f"components {list(components)}: choose from {list(COMPONENTS)}")
    if ema and "unet" not in components:
        raise ConversionError(f"components {list(components)}: EMA weights are the UNet's; --ema needs unet")
    configs = read_configs(config, text_config)
    output = Path(output)
    check_writable(output.parent, output)  # before minutes of loading, not after
    state_dict = load_original_state_dict(checkpoint)
    models = build_empty_models(configs, components)
    plans = make_plans(models, configs)
    state_dict = select_weights(state_dict, plans, ema, str(checkpoint))
    check_state_dict({k: tuple(v.shape) for k, v in state_dict.items()}, plans, str(checkpoint))
    size = sum(4 * torch.Size(src.shape).numel() for plan in plans.values() for src in plan.sources.values())
    try:
        _write_folder(output, overwrite, configs, models, plans, state_dict)
    except FileExistsError:
        raise
    except (OSError, SafetensorError) as exc:  # disk full, read-only: safetensors' error names no file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OutputWriteError(f"{output}: could not write the converted model ({reason}); it needs about "
                               f"{size / 1e9:.2f} GB free") from exc
    logger.info("wrote %s", output)
    return output


def check_writable(folder: Path, output: Path) -> None:
    """A file can be created in ``folder`` (or in its nearest existing parent; nothing is left behind): a read-only
    or foreign folder fails here, naming ``output``."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise OutputWriteError(f"{output}: cannot write into {existing} ({exc.strerror or exc})") from exc


def _write_folder(output: Path, overwrite: bool, configs: ModelConfigs, models: dict[str, torch.nn.Module],
                  plans: dict[str, Plan], state_dict: dict[str, torch.Tensor]) -> None:
    with atomic_dir(output, overwrite=overwrite) as tmp:
        index = {"_class_name": "VideoCrafter2Pipeline", "_diffusers_version": _diffusers_version(),
                 "_customcrafter_converter": CONVERTER_VERSION}
        for name in COMPONENTS:
            if name in models:
                logger.info("converting %s (%d tensors)", name, len(plans[name].sources))
                _materialise(models[name], plans[name], state_dict).save_pretrained(tmp / name,
                                                                                    safe_serialization=True)
                library = "transformers" if name == "text_encoder" else (
                    "customcrafter.models.unet" if name == "unet" else "diffusers")
                index[name] = [library, type(models[name]).__name__]
            else:
                index[name] = [None, None]
        load_tokenizer().save_pretrained(tmp / "tokenizer")
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
        VideoCrafter2DDIMScheduler(**configs.scheduler).save_pretrained(tmp / "scheduler")
        index["scheduler"] = ["customcrafter.scheduler", "VideoCrafter2DDIMScheduler"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
