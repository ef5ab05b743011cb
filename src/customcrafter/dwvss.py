"""Dynamic Weighted Video Sampling (DWVSS, CustomCrafter Algorithm 1).

The LoRA scale is λs for the first K DDIM steps (the model lays out motion and layout; a weak subject module keeps
the base model's motion) and λl for the rest (appearance). Same scale for the conditional and unconditional CFG
branches. Paper defaults: λs 0.4, λl 0.8, K 5 of 50.

``mode="reference"`` reproduces the reference code: the first phase runs K-1 steps at λs, the step at index K-1
(t = 901 with 50 steps) is skipped (the latent after step K-2 is fed straight into step K), then the remaining
steps at λl: 49 effective steps. K must be below the number of steps there (``DWVSSConfig.check_steps``): with K ≥
steps the reference code skips the final step and returns a latent that is not fully denoised.

Speed: changing a peft adapter scale touches every wrapped layer from Python on every call, and Python-float scales
may recompile under ``torch.compile``. So :class:`LoraPhaseFuser` *fuses* ``W = W0 + s·ΔW`` into the base weights
once per phase (twice per video), runs the UNet with the LoRA branch switched off, and restores the original
weights bit for bit from a saved copy at the end (also on exceptions).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, ValidationError, model_validator

from customcrafter.config import StrictModel

__all__ = ["DWVSSConfig", "DWVSSPlan", "dwvss_plan", "LoraPhaseFuser", "DWVSSCallback", "dwvss_sampling",
           "parse_dwvss"]

logger = logging.getLogger(__name__)


class DWVSSConfig(StrictModel):
    """The DWVSS schedule. Defaults = the paper."""

    lambda_s: float = Field(0.4, ge=0, description="LoRA scale of the first K steps (motion, layout)")
    lambda_l: float = Field(0.8, ge=0, description="LoRA scale of the remaining steps (appearance)")
    k: int = Field(5, ge=0, description="number of steps at lambda_s, a count of the steps actually run, not a "
                                        "share: the paper's 5 of 50 are the first 10 %; at 25 steps the same share "
                                        "is k=3 (round(5 * steps / 50)); not rescaled automatically. Paper mode: k >= "
                                        "the number of steps runs every step at lambda_s (Algorithm 1 as written); "
                                        "reference mode: k must be below the number of steps (see mode)")
    mode: Literal["paper", "reference"] = Field("paper", description="'reference' = the reference code: K-1 steps "
                                                                     "at lambda_s, step K-1 skipped; needs 1 <= k < "
                                                                     "the number of steps, else the skipped step "
                                                                     "would be the final one (a usage error)")

    @model_validator(mode="after")
    def _check(self) -> DWVSSConfig:
        if self.mode == "reference" and self.k < 1:
            raise ValueError("dwvss.k must be >= 1 in reference mode (it skips step k-1)")
        return self

    def check_steps(self, num_steps: int) -> None:
        """Refuse a schedule that cannot mean what the paper means for ``num_steps`` DDIM steps: in reference mode
        ``k >= num_steps`` would skip the final step (a latent left noisy). Paper mode takes any k (all steps at
        lambda_s once k >= num_steps). The one place this rule lives: SampleConfig and dwvss_plan call it."""
        if self.mode == "reference" and self.k >= num_steps:
            raise ValueError(f"dwvss.k ({self.k}) must be below num_inference_steps ({num_steps}) in reference mode: "
                             f"it skips step k-1, here the final step, so the video would not be fully denoised; "
                             f"use a smaller k, more steps, or mode 'paper'")


def parse_dwvss(text: str) -> DWVSSConfig:
    """``"0.4,0.8,5"`` (optionally ``",reference"``) -> DWVSSConfig; errors name the value."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (3, 4):
        raise ValueError(f"--dwvss {text!r}: expected LAMBDA_S,LAMBDA_L,K[,paper|reference]")
    try:
        values = {"lambda_s": float(parts[0]), "lambda_l": float(parts[1]), "k": int(parts[2])}
    except ValueError:
        raise ValueError(f"--dwvss {text!r}: LAMBDA_S and LAMBDA_L must be numbers and K an integer") from None
    if len(parts) == 4:
        values["mode"] = parts[3]
    try:
        return DWVSSConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"--dwvss {text!r}: {problems}") from None


@dataclass(frozen=True)
class DWVSSPlan:
    """Per DDIM step: the LoRA scale, and which steps are skipped (their latent update discarded)."""

    scales: tuple[float, ...]
    skipped: frozenset[int] = field(default_factory=frozenset)


def dwvss_plan(config: DWVSSConfig | None, num_steps: int, constant: float = 1.0) -> DWVSSPlan:
    """The schedule for ``num_steps`` DDIM steps; ``config=None`` = a constant scale (plain LoRA sampling)."""
    if config is None:
        return DWVSSPlan(scales=(float(constant),) * num_steps)
    config.check_steps(num_steps)
    k = min(config.k, num_steps)
    if config.mode == "paper":
        scales = [config.lambda_s] * k + [config.lambda_l] * (num_steps - k)
        return DWVSSPlan(scales=tuple(scales))
    # Reference code: phase 1 runs K steps at λs but keeps the latent after K-1; phase 2 starts one step later.
    scales = [config.lambda_s] * k + [config.lambda_l] * (num_steps - k)
    return DWVSSPlan(scales=tuple(scales), skipped=frozenset({k - 1}))


def _lora_layers(model: torch.nn.Module, adapter_names: list[str] | None):
    from peft.tuners.lora import LoraLayer

    layers = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            names = [a for a in module.lora_A if adapter_names is None or a in adapter_names]
            names = [a for a in names if a in module.active_adapters]
            if names:
                layers.append((name, module, names))
    return layers


class LoraPhaseFuser:
    """Fuse LoRA adapters into their base weights at a chosen scale; restore the originals bit for bit.

    ``W = W0 + scale · Σ_a ΔW_a`` where ``ΔW_a = B_a A_a · scaling_a`` (peft's ``get_delta_weight``, so per-adapter
    weights set with ``set_adapters`` are honoured). While fused, the LoRA branch is disabled so it is not added
    twice. Keeps one copy of each wrapped weight and of its ΔW (the spatial q/k/v weights only, not the whole UNet;
    143 MiB in bf16 for VideoCrafter2's 96 layers), both taken when the block is entered: re-fusing is then two
    multi-tensor ops (``torch._foreach_copy_``, ``torch._foreach_add_``) instead of ~6 ops per layer. (Host work at
    a video's start delays its first step, as the GPU has nothing else queued then: session 27 profiled ~30 ms of
    idle GPU per video there.) The adapters' weights must not change inside the block.
    """

    def __init__(self, model: torch.nn.Module, adapter_names: list[str] | None = None):
        self.model = model
        self.layers = _lora_layers(model, adapter_names)
        self.originals: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []
        self._deltas: list[torch.Tensor] = []
        self.scale: float | None = None
        self._entered = False

    def __enter__(self) -> LoraPhaseFuser:
        self._weights = [m.get_base_layer().weight for _, m, _ in self.layers]
        self.originals = [w.detach().clone() for w in self._weights]
        with torch.no_grad():
            self._deltas = [sum(m.get_delta_weight(a) for a in names).to(w.dtype)
                            for (_, m, names), w in zip(self.layers, self._weights, strict=True)]
        self._was_disabled = [m.disable_adapters for _, m, _ in self.layers]
        for _, module, _ in self.layers:
            # The flag itself, not peft's enable_adapters(): that also flips requires_grad of the LoRA weights.
            module._disable_adapters = True
        self._entered = True
        return self

    @torch.no_grad()
    def set_scale(self, scale: float) -> None:
        """Fuse at ``scale`` (from the original weights, so errors never accumulate across phases)."""
        if not self._entered:
            raise RuntimeError("LoraPhaseFuser.set_scale outside its `with` block")
        if self._weights:
            torch._foreach_copy_(self._weights, self.originals)
            if scale != 0.0:
                torch._foreach_add_(self._weights, self._deltas, alpha=scale)
        self.scale = scale

    @torch.no_grad()
    def restore(self) -> None:
        if self._weights:
            torch._foreach_copy_(self._weights, self.originals)
        for (_, module, _), was_disabled in zip(self.layers, self._was_disabled, strict=True):
            module._disable_adapters = was_disabled
        self.originals, self._weights, self._deltas = [], [], []
        self.scale = None
        self._entered = False

    def __exit__(self, *exc) -> None:
        self.restore()


class DWVSSCallback:
    """``on_step_begin`` hook for the pipeline: re-fuse at phase boundaries only; record the scale of every step.

    Skipped steps (reference mode) are implemented by making that step's scheduler update return its input latent.
    """

    def __init__(self, fuser: LoraPhaseFuser, plan: DWVSSPlan):
        self.fuser = fuser
        self.plan = plan
        self.recorded: list[float] = []
        self.skipped: list[int] = []

    def __call__(self, pipe, step_index: int, timestep) -> None:
        if step_index >= len(self.plan.scales):
            raise ValueError(f"DWVSS plan has {len(self.plan.scales)} steps but the sampler asked for step "
                             f"{step_index}; build the plan with the same num_inference_steps")
        scale = self.plan.scales[step_index]
        if scale != self.fuser.scale:
            self.fuser.set_scale(scale)
        self.recorded.append(scale)
        if step_index in self.plan.skipped:
            _skip_next_scheduler_step(pipe.scheduler)
            self.skipped.append(step_index)


def _skip_next_scheduler_step(scheduler) -> None:
    """Make the scheduler's next ``step`` a no-op on the latent (returns the sample unchanged), once."""
    def passthrough(model_output, timestep, sample, *args, **kwargs):
        del scheduler.step  # back to the class method for every later step
        if hasattr(scheduler, "_step_index") and scheduler._step_index is not None:
            scheduler._step_index += 1
        return_dict = kwargs.get("return_dict", True)
        if not return_dict:
            return (sample,)
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

        return DDIMSchedulerOutput(prev_sample=sample, pred_original_sample=None)

    scheduler.step = passthrough


@contextlib.contextmanager
def dwvss_sampling(unet: torch.nn.Module, config: DWVSSConfig | None, num_steps: int,
                   adapter_names: list[str] | None = None, constant: float = 1.0) -> Iterator[DWVSSCallback | None]:
    """Yield the ``on_step_begin`` callback for one video; the UNet's weights are restored on exit.

    Yields None when the UNet has no active LoRA adapter (base model or a baseline): nothing to schedule.
    """
    fuser = LoraPhaseFuser(unet, adapter_names)
    if not fuser.layers:
        yield None
        return
    plan = dwvss_plan(config, num_steps, constant)
    with fuser:
        yield DWVSSCallback(fuser, plan)
