"""Subject-learning methods as small strategies plugged into the one training loop.

A strategy says what is trainable (per stage), what is saved, and how a saved module is loaded back onto a base
pipeline. Every method also learns the placeholder token's embedding row (handled here, in the base class).

- ``customcrafter`` (SSLM): peft LoRA on ``to_q/to_k/to_v`` of ``attn1`` and ``attn2`` of every *spatial*
  transformer block (96 layers on the full model) + the token. Saved in the standard peft layout.
- ``custom_diffusion`` / ``_long``: spatial cross-attention ``attn2.to_k`` / ``attn2.to_v`` fully trainable + the
  token. Saved as compact deltas ``W - W0``.
- ``dreamvideo`` / ``_long``: stage 1 textual inversion (token only), stage 2 an identity adapter in parallel with
  the spatial cross-attention (token frozen). Saved as the adapter weights.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from customcrafter.training.config import TrainConfig

__all__ = ["Stage", "SubjectMethod", "CustomCrafterMethod", "CustomDiffusionMethod", "DreamVideoMethod",
           "make_method", "method_class", "lora_target_regex", "spatial_block_names", "IdentityAdapter",
           "attach_identity_adapters", "PEFT_KEY_PREFIX"]

logger = logging.getLogger(__name__)

#: Spatial transformer blocks: the dot before ``attentions`` excludes ``temp_attentions``; ``transformer_in`` is not
#: matched either.
SPATIAL_BLOCK_RE = r".*\.attentions\.\d+\.transformer_blocks\.\d+"
TEMPORAL_BLOCK_RE = r".*\.temp_attentions\.\d+\.transformer_blocks\.\d+"
#: Keys of stock peft's ``adapter_model.safetensors`` (``PeftModel.save_pretrained``) start with this.
PEFT_KEY_PREFIX = "base_model.model."
ADAPTER_NAME = "subject"


def lora_target_regex(targets: str = "qkv", temporal: bool = False) -> str:
    """The peft ``target_modules`` regex (full match against module names) of the SSLM LoRA."""
    projections = r"(to_q|to_k|to_v)" if targets == "qkv" else r"(to_q|to_k|to_v|to_out\.0)"
    blocks = r".*\.(temp_)?attentions\.\d+\.transformer_blocks\.\d+" if temporal else SPATIAL_BLOCK_RE
    return rf"{blocks}\.attn[12]\.{projections}"


def spatial_block_names(unet: nn.Module) -> list[str]:
    """Names of the spatial ``BasicTransformerBlock``s (16 on the full model)."""
    return [name for name, _ in unet.named_modules() if re.fullmatch(SPATIAL_BLOCK_RE, name)]


@dataclass(frozen=True)
class Stage:
    """One training stage: how many steps, with which optimiser settings, and whether the token learns."""

    name: str
    steps: int
    lr: float
    weight_decay: float
    train_token: bool = True


class SubjectMethod:
    """Base strategy. Subclasses add their UNet parameters; the token row is common to all."""

    name = "base"
    uses_lora = False  # DWVSS applies to LoRA modules only

    def __init__(self, config: TrainConfig):
        self.config = config
        self.unet: nn.Module | None = None
        self.text_encoder: nn.Module | None = None
        self.token_ids: list[int] = []

    # --- what the loop asks -------------------------------------------------------------------------------------
    def stages(self, global_batch: int = 1) -> list[Stage]:
        """The stages in order, for ``global_batch`` instance clips per step over all processes."""
        config = self.config
        return [Stage(self.name, config.resolved_steps(), config.resolved_lr(global_batch), config.weight_decay)]

    def setup(self, pipe, token_ids: list[int]) -> None:
        """Freeze everything, splice the trainable token row(s) in, then add the method's trainable parts."""
        from customcrafter.training.tokens import splice_new_rows

        self.unet, self.text_encoder, self.token_ids = pipe.unet, pipe.text_encoder, list(token_ids)
        for module in (pipe.unet, pipe.text_encoder, pipe.vae):
            module.requires_grad_(False)
        self.token_embedding = splice_new_rows(pipe.text_encoder, self.token_ids)
        self.setup_unet(pipe.unet)

    def setup_unet(self, unet: nn.Module) -> None:
        raise NotImplementedError

    def unet_parameters(self, stage: Stage) -> dict[str, nn.Parameter]:
        """The UNet (or adapter) tensors that learn in ``stage``, by stable name."""
        raise NotImplementedError

    def begin_stage(self, stage: Stage) -> list[nn.Parameter]:
        """Set requires_grad for ``stage``; return the parameters to hand to the optimiser."""
        for param in self.all_unet_parameters().values():
            param.requires_grad_(False)
        params = list(self.unet_parameters(stage).values())
        for param in params:
            param.requires_grad_(True)
        self.token_embedding.new_rows.requires_grad_(stage.train_token)
        if stage.train_token:
            params.append(self.token_embedding.new_rows)
        return params

    def all_unet_parameters(self) -> dict[str, nn.Parameter]:
        merged: dict[str, nn.Parameter] = {}
        for stage in self.stages():
            merged.update(self.unet_parameters(stage))
        return merged

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything this method learns (all stages), for checkpoints: ``unet.<name>`` and ``token.new_rows``."""
        state = {f"unet.{k}": v.detach() for k, v in self.all_unet_parameters().items()}
        state["token.new_rows"] = self.token_embedding.new_rows.detach()
        return state

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.trainable_state()
        missing, unexpected = set(expected) - set(state), set(state) - set(expected)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match method {self.name!r}: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
        params = {f"unet.{k}": v for k, v in self.all_unet_parameters().items()}
        params["token.new_rows"] = self.token_embedding.new_rows
        for key, param in params.items():
            param.copy_(state[key].to(param.device, param.dtype))

    # --- the saved module ---------------------------------------------------------------------------------------
    def save(self, module_dir: Path) -> dict:
        """Write the method's weight files into ``module_dir``; return metadata for module.json."""
        raise NotImplementedError

    @classmethod
    def load(cls, pipe, module_dir: Path, adapter_name: str, meta: dict) -> None:
        """Apply a saved module's weights (not the token: subject_module does that) to ``pipe``."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------------------------
class CustomCrafterMethod(SubjectMethod):
    """SSLM: rank-4 LoRA on the spatial attention q/k/v + the token; trained at LoRA scale 1."""

    name = "customcrafter"
    uses_lora = True

    def lora_config(self):
        from peft import LoraConfig

        config = self.config
        # alpha = rank: no extra scaling (the reference adds up(down(x)) directly). "gaussian" init in peft is
        # down ~ N(0, (1/r)^2), up = 0: the reference's initialisation.
        return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, lora_dropout=0.0,
                          init_lora_weights="gaussian",
                          target_modules=lora_target_regex(config.lora_targets, config.lora_temporal))

    def setup_unet(self, unet: nn.Module) -> None:
        unet.add_adapter(self.lora_config(), adapter_name=ADAPTER_NAME)
        unet.requires_grad_(False)
        self._lora = {name: param for name, param in unet.named_parameters()
                      if ".lora_A." in name or ".lora_B." in name}
        if not self._lora:
            raise ValueError("the LoRA target regex matched no layer of this UNet")
        logger.info("SSLM LoRA: %d layers, %d parameters", len(self._lora) // 2,
                    sum(p.numel() for p in self._lora.values()))

    def unet_parameters(self, stage: Stage) -> dict[str, nn.Parameter]:
        return self._lora

    def save(self, module_dir: Path) -> dict:
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER_NAME)
        state = {PEFT_KEY_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        save_file(state, str(module_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        self.unet.peft_config[ADAPTER_NAME].save_pretrained(str(module_dir))
        return {"files": ["adapter_config.json", "adapter_model.safetensors"], "lora_layers": len(state) // 2}

    @classmethod
    def load(cls, pipe, module_dir: Path, adapter_name: str, meta: dict) -> None:
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict

        config = LoraConfig.from_pretrained(str(module_dir))
        state = load_file(str(module_dir / "adapter_model.safetensors"))
        state = {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in state.items()}
        pipe.unet.add_adapter(config, adapter_name=adapter_name)
        try:
            result = set_peft_model_state_dict(pipe.unet, state, adapter_name=adapter_name)
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if unexpected:
                raise ValueError(f"{module_dir / 'adapter_model.safetensors'}: keys that match no layer of this "
                                 f"UNet, e.g. {unexpected[0]!r}")
        except BaseException:  # nothing half-loaded: the adapter goes again
            pipe.unet.delete_adapters(adapter_name)
            raise
        pipe.unet.requires_grad_(False)


# ------------------------------------------------------------------------------------------------------------------
def custom_diffusion_param_names(unet: nn.Module) -> list[str]:
    """``attn2.to_k.weight`` / ``attn2.to_v.weight`` of the spatial blocks (cross-attention key and value)."""
    pattern = SPATIAL_BLOCK_RE + r"\.attn2\.(to_k|to_v)\.weight"
    return [name for name, _ in unet.named_parameters() if re.fullmatch(pattern, name)]


class CustomDiffusionMethod(SubjectMethod):
    """Custom Diffusion: the spatial cross-attention K/V projections fully trained + the token."""

    name = "custom_diffusion"

    def setup_unet(self, unet: nn.Module) -> None:
        params = dict(unet.named_parameters())
        self._kv = {name: params[name] for name in custom_diffusion_param_names(unet)}
        if not self._kv:
            raise ValueError("no spatial attn2.to_k/to_v in this UNet")
        # W0 on the CPU: the saved module is the delta W - W0, and the GPU memory is better spent elsewhere.
        self._initial = {name: p.detach().to("cpu", copy=True) for name, p in self._kv.items()}

    def unet_parameters(self, stage: Stage) -> dict[str, nn.Parameter]:
        return self._kv

    def save(self, module_dir: Path) -> dict:
        deltas = {name: (p.detach().float().cpu() - self._initial[name].float()).contiguous()
                  for name, p in self._kv.items()}
        save_file(deltas, str(module_dir / "deltas.safetensors"), metadata={"format": "pt", "kind": "W - W0"})
        return {"files": ["deltas.safetensors"], "delta_tensors": len(deltas)}

    @classmethod
    @torch.no_grad()
    def load(cls, pipe, module_dir: Path, adapter_name: str, meta: dict) -> None:
        """Add the deltas to the base weights; every delta is matched first, so a mismatch changes nothing."""
        deltas = load_file(str(module_dir / "deltas.safetensors"))
        params = {name: _base_weight(pipe.unet, name, delta.shape, module_dir / "deltas.safetensors")
                  for name, delta in deltas.items()}
        for name, delta in deltas.items():
            param = params[name]
            param.copy_((param.float() + delta.to(param.device)).to(param.dtype))


def _base_weight(unet: nn.Module, name: str, shape: torch.Size, source: Path) -> nn.Parameter:
    """The weight ``<layer>.weight`` of ``unet``; when a LoRA module loaded before wrapped the layer (peft renames
    it ``<layer>.base_layer.weight``), the wrapped layer's own weight."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer_name, _, attribute = name.rpartition(".")
    try:
        layer = unet.get_submodule(layer_name)
    except AttributeError:
        layer = None
    if isinstance(layer, BaseTunerLayer):
        layer = layer.get_base_layer()
    param = getattr(layer, attribute, None)
    if not isinstance(param, nn.Parameter):
        raise ValueError(f"{source}: {name!r} has no matching parameter in this UNet")
    if param.shape != shape:
        raise ValueError(f"{source}: {name!r} has shape {tuple(shape)} but this UNet's is {tuple(param.shape)}")
    return param


class CustomDiffusionLongMethod(CustomDiffusionMethod):
    name = "custom_diffusion_long"


# ------------------------------------------------------------------------------------------------------------------
class IdentityAdapter(nn.Module):
    """DreamVideo's identity adapter: Linear(dim, dim·r) -> GELU -> Linear(dim·r, dim), up zero-initialised."""

    def __init__(self, dim: int, hidden_ratio: float = 0.5):
        super().__init__()
        hidden = max(1, int(dim * hidden_ratio))
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)  # the model starts exactly unchanged

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(hidden_states)))


def _identity_hooks(block: nn.Module):
    """The two forward hooks of one block; closures, so that no module holds a reference cycle to its parent."""

    def stash_input(norm2, args, output):
        # norm2's input is the un-normalised residual stream h that the cross-attention sub-layer reads.
        block._identity_input = args[0]

    def add_adapter_output(attn2, args, kwargs, output):
        hidden_states, block._identity_input = block._identity_input, None
        if not block.identity_adapters:  # every adapter removed again (a load that failed)
            return output
        extra = sum(adapter(hidden_states) for adapter in block.identity_adapters.values())
        return output + extra.to(output.dtype)

    return stash_input, add_adapter_output


def attach_identity_adapters(unet: nn.Module, adapter_name: str, hidden_ratio: float = 0.5) -> dict[str, nn.Module]:
    """Add an :class:`IdentityAdapter` named ``adapter_name`` to every spatial transformer block.

    In diffusers' ``BasicTransformerBlock`` (norm_type "layer_norm") the cross-attention sub-layer is
    ``h = attn2(norm2(h)) + h``. A forward hook on ``norm2`` keeps ``h``; one on ``attn2`` adds ``Adapter(h)`` to its
    output, giving DreamVideo's ``h <- h + attn2(LN(h)) + Adapter(h)``. Adapters are registered inside the block
    (``identity_adapters``), so they move with the UNet and DDP sees their parameters. Returns name -> adapter.
    """
    reference = next(unet.parameters())
    adapters = {}
    for name in spatial_block_names(unet):
        block = unet.get_submodule(name)
        if not hasattr(block, "identity_adapters"):
            block.identity_adapters = nn.ModuleDict()
            block._identity_input = None
            stash_input, add_adapter_output = _identity_hooks(block)
            block.norm2.register_forward_hook(stash_input)
            block.attn2.register_forward_hook(add_adapter_output, with_kwargs=True)
        if adapter_name in block.identity_adapters:
            raise ValueError(f"identity adapter {adapter_name!r} is already attached to {name}")
        adapter = IdentityAdapter(block.norm2.normalized_shape[0], hidden_ratio)
        block.identity_adapters[adapter_name] = adapter.to(reference.device, reference.dtype)
        adapters[name] = adapter
    if not adapters:
        raise ValueError("no spatial transformer block found for the identity adapters")
    return adapters


class DreamVideoMethod(SubjectMethod):
    """DreamVideo subject learning: textual inversion, then the identity adapter with the token frozen."""

    name = "dreamvideo"

    def stages(self, global_batch: int = 1) -> list[Stage]:
        dv = self.config.dreamvideo
        stages = [Stage("textual_inversion", dv.inversion_steps, dv.inversion_lr, dv.weight_decay,
                        train_token=True),
                  Stage("identity_adapter", self.config.resolved_steps(), self.config.resolved_lr(global_batch),
                        dv.weight_decay, train_token=False)]
        return [s for s in stages if s.steps > 0]

    def setup_unet(self, unet: nn.Module) -> None:
        adapters = attach_identity_adapters(unet, ADAPTER_NAME, self.config.dreamvideo.adapter_hidden_ratio)
        self._adapter_params = {f"{block}.identity_adapters.{ADAPTER_NAME}.{k}": p
                                for block, adapter in adapters.items() for k, p in adapter.named_parameters()}

    def unet_parameters(self, stage: Stage) -> dict[str, nn.Parameter]:
        return {} if stage.name == "textual_inversion" else self._adapter_params

    def all_unet_parameters(self) -> dict[str, nn.Parameter]:
        return self._adapter_params

    def save(self, module_dir: Path) -> dict:
        state = {name.replace(f".identity_adapters.{ADAPTER_NAME}.", ".identity_adapter."):
                 p.detach().to("cpu", torch.float32).contiguous() for name, p in self._adapter_params.items()}
        save_file(state, str(module_dir / "identity_adapter.safetensors"), metadata={"format": "pt"})
        (module_dir / "identity_adapter.json").write_text(json.dumps(
            {"hidden_ratio": self.config.dreamvideo.adapter_hidden_ratio, "blocks": len(state) // 4}, indent=2))
        return {"files": ["identity_adapter.safetensors", "identity_adapter.json"]}

    @classmethod
    @torch.no_grad()
    def load(cls, pipe, module_dir: Path, adapter_name: str, meta: dict) -> None:
        info = json.loads((module_dir / "identity_adapter.json").read_text())
        state = load_file(str(module_dir / "identity_adapter.safetensors"))
        adapters = attach_identity_adapters(pipe.unet, adapter_name, info["hidden_ratio"])
        try:
            for block, adapter in adapters.items():
                for key, param in adapter.named_parameters():
                    stored = state.pop(f"{block}.identity_adapter.{key}", None)
                    if stored is None or stored.shape != param.shape:
                        raise ValueError(f"{module_dir / 'identity_adapter.safetensors'}: no tensor for "
                                         f"{block}.identity_adapter.{key} with shape {tuple(param.shape)}")
                    param.copy_(stored)
                adapter.requires_grad_(False)
            if state:
                raise ValueError(f"{module_dir / 'identity_adapter.safetensors'}: tensors for blocks this UNet "
                                 f"lacks, e.g. {next(iter(state))!r}")
        except BaseException:  # nothing half-loaded: the adapters go again
            for block in adapters:
                del pipe.unet.get_submodule(block).identity_adapters[adapter_name]
            raise


class DreamVideoLongMethod(DreamVideoMethod):
    name = "dreamvideo_long"


_METHODS: dict[str, type[SubjectMethod]] = {m.name: m for m in (
    CustomCrafterMethod, CustomDiffusionMethod, CustomDiffusionLongMethod, DreamVideoMethod, DreamVideoLongMethod)}


def method_class(name: str) -> type[SubjectMethod]:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(_METHODS)}")
    return _METHODS[name]


def make_method(config: TrainConfig) -> SubjectMethod:
    return method_class(config.method)(config)
