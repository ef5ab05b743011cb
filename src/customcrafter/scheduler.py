"""VideoCrafter2's DDIM sampler as a diffusers scheduler (``DDIMScheduler`` API) with its x0 scaling.

VideoCrafter2 trains with a per-timestep scale s(t) on the clean latents (``use_scale``):

    x_t = sqrt(ᾱ_t) · s(t) · x0 + sqrt(1 − ᾱ_t) · ε,    s = linspace(1, scale_b, mid_step) then scale_b

and its DDIM step divides the predicted x0 by s at the current DDIM timestep and rebuilds x_{t−1} with the scale at
the previous DDIM timestep. Everything else is diffusers' ``DDIMScheduler`` with the original's schedule (scaled-linear
betas 0.00085 → 0.012, "leading" spacing with ``steps_offset`` 1, so 50 steps are 981 … 1).

The step's coefficients come from the host-side schedule with Python-int indices (``self.timesteps`` stays on the
CPU), so a sampling loop on a GPU never waits for the device.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMScheduler, DDIMSchedulerOutput

# DiffusionPipeline.from_pretrained finds a component's base class (its load method) in the component's module.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401, E402
from diffusers.utils.torch_utils import randn_tensor


class VideoCrafter2DDIMScheduler(DDIMScheduler):
    """DDIMScheduler with VideoCrafter2's defaults and x0 scale.

    Extra config (defaults as VideoCrafter2 ships):
        use_scale: apply the x0 scale in ``step`` and ``add_noise`` (CustomCrafter's reference sampler runs without
            it: pass False to reproduce that).
        scale_b: the scale's final value.
        mid_step: number of timesteps over which the scale goes linearly from 1 to ``scale_b``.

    On the last step (no previous DDIM timestep) x0 is rebuilt with s(0) = 1, as the original sampler does (checked
    against its outputs: using s at the first DDIM timestep instead is off by 7.5e-4 relative).
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = False,
        set_alpha_to_one: bool = False,
        steps_offset: int = 1,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        use_scale: bool = True,
        scale_b: float = 0.7,
        mid_step: int = 400,
    ):
        super().__init__(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset, prediction_type=prediction_type,
            thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range, sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing, rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        if prediction_type != "epsilon":
            raise ValueError(f"prediction_type={prediction_type!r}: VideoCrafter2 predicts 'epsilon'")
        if not 0 < mid_step <= num_train_timesteps:
            raise ValueError(f"mid_step={mid_step} must be in 1..num_train_timesteps ({num_train_timesteps})")
        # Length mid_step + num_train_timesteps (1400), as the original; only the first 1000 are ever indexed.
        scale = np.concatenate([np.linspace(1.0, scale_b, mid_step), np.full(num_train_timesteps, scale_b)])
        self.scale_arr = torch.tensor(scale if use_scale else np.ones_like(scale), dtype=torch.float32)
        # float64 host copies for the step coefficients (the original computes them in numpy float64).
        self._alphas_cumprod64 = self.alphas_cumprod.double()
        self._scale64 = torch.tensor(scale if use_scale else np.ones_like(scale), dtype=torch.float64)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """As DDIMScheduler, but ``self.timesteps`` stays on the CPU (``device`` is accepted and ignored) so that
        the step's indexing never synchronises with an accelerator."""
        super().set_timesteps(num_inference_steps, device=None)

    def _coefficients(self, t: int, prev_t: int) -> tuple[float, float, float, float]:
        """ᾱ_t, ᾱ_prev, s(t), s(prev) for DDIM timesteps ``t`` → ``prev_t`` (prev_t < 0 on the last step)."""
        alpha_t = float(self._alphas_cumprod64[t])
        alpha_prev = float(self._alphas_cumprod64[prev_t]) if prev_t >= 0 else float(self.final_alpha_cumprod)
        scale_t = float(self._scale64[t])
        scale_prev = float(self._scale64[max(prev_t, 0)])
        return alpha_t, alpha_prev, scale_t, scale_prev

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step x_t → x_{t−1} (DDIM paper eq. 12) with VideoCrafter2's x0 scale.

        ``timestep`` should be a Python int or a CPU tensor (from ``self.timesteps``). ``variance_noise`` (same shape
        as ``sample``) is the standard normal draw multiplied by σ_t when ``eta`` > 0; when None it is drawn from
        ``generator``. Returns ``DDIMSchedulerOutput(prev_sample, pred_original_sample)``; ``pred_original_sample`` is
        the predicted x0 after dividing by s(t).
        """
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is not set: call set_timesteps(...) first")
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_t, alpha_prev, scale_t, scale_prev = self._coefficients(t, prev_t)
        # σ_t = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev))
        sigma = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)) ** 0.5

        x = sample.float()
        eps = model_output.float()
        pred_x0 = (x - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
        if self.config.clip_sample:
            pred_x0 = pred_x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        pred_x0 = pred_x0 / scale_t
        if use_clipped_model_output:
            eps = (x - alpha_t**0.5 * scale_t * pred_x0) / (1 - alpha_t) ** 0.5
        direction = (1 - alpha_prev - sigma**2) ** 0.5 * eps
        prev_sample = alpha_prev**0.5 * scale_prev * pred_x0 + direction
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32
                )
            elif variance_noise.shape != sample.shape:
                raise ValueError(f"variance_noise has shape {tuple(variance_noise.shape)}, sample {tuple(sample.shape)}")
            prev_sample = prev_sample + sigma * variance_noise.float()

        prev_sample = prev_sample.to(sample.dtype)
        pred_x0 = pred_x0.to(sample.dtype)
        if not return_dict:
            return (prev_sample, pred_x0)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_x0)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """Training noise: sqrt(ᾱ_t) · s(t) · x0 + sqrt(1 − ᾱ_t) · ε, with ``timesteps`` (B,) on any device."""
        device = original_samples.device
        timesteps = timesteps.to(device).long()
        alphas = self.alphas_cumprod.to(device)[timesteps]
        scale = self.scale_arr.to(device)[timesteps]
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        signal = (alphas.sqrt() * scale).reshape(shape)
        noise_level = (1 - alphas).sqrt().reshape(shape)
        noisy = signal * original_samples.float() + noise_level * noise.float()
        return noisy.to(original_samples.dtype)
