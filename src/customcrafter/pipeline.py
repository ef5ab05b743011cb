"""Text → video with VideoCrafter2: a diffusers ``DiffusionPipeline``.

Sampling is VideoCrafter2's: DDIM with its x0 scale (``VideoCrafter2DDIMScheduler``), classifier-free guidance
against the empty prompt, fps conditioning, latents decoded frame by frame.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from customcrafter.models.text import encode_prompt as _encode_prompt
from customcrafter.models.unet import VideoCrafter2UNet
from customcrafter.models.vae import decode_video
from customcrafter.scheduler import VideoCrafter2DDIMScheduler

#: Called before each denoising step as ``on_step_begin(pipe, step_index, timestep)`` (e.g. to change LoRA scales).
StepHook = Callable[["VideoCrafter2Pipeline", int, int], None]
#: ``noise_sampler(step_index, shape) -> Tensor``: the standard normal noise of an η > 0 step.
NoiseSampler = Callable[[int, tuple[int, ...]], torch.Tensor]


class HostStepNoise:
    """The η > 0 noise of every step drawn from host (CPU) generators by a background thread, in sampling order (the
    same draws, in the same order, as drawing step by step), into pinned memory on CUDA; each step's noise is copied
    to ``device`` without making the host wait. So the draws overlap the GPU's steps: drawn all before the loop
    (and stacked, and copied into pinned memory) they kept the GPU waiting for the host at the start of every video
    (50 steps of a 16 x 40 x 64 latent: 65-130 ms of drawing alone on a 2-core CPU; what this saves on a GPU is not
    measured yet), and copied per step from pageable memory they would make the host wait for the GPU inside the
    loop. ``close()`` (the pipeline calls it after the loop) waits for the thread, so the generators are the
    caller's again, advanced by ``num_steps`` draws as before."""

    def __init__(self, generator, shape: tuple[int, ...], num_steps: int, device: torch.device):
        self.device = device
        self._buffer = torch.empty((num_steps, *shape), dtype=torch.float32, pin_memory=device.type == "cuda")
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="customcrafter-step-noise")
        self._drawn = [self._worker.submit(self._draw, generator, step, shape) for step in range(num_steps)]

    def _draw(self, generator, step: int, shape: tuple[int, ...]) -> None:
        self._buffer[step].copy_(randn_tensor(shape, generator=generator, device=torch.device("cpu"),
                                              dtype=torch.float32))

    def __call__(self, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        self._drawn[step].result()  # re-raises the thread's error, if any
        if tuple(shape) != tuple(self._buffer.shape[1:]):
            raise ValueError(f"step noise has shape {tuple(self._buffer.shape[1:])}, asked for {tuple(shape)}")
        return self._buffer[step].to(self.device, non_blocking=True)

    def close(self) -> None:
        """Wait for the draws still running (cancelling those not started: an interrupted loop)."""
        self._worker.shutdown(wait=True, cancel_futures=True)


def _negative_prompts(negative_prompt: str | list[str], batch: int) -> list[str]:
    """One negative prompt per video: a string or a one-element list is repeated (as one negative embedding is
    broadcast), any other list must have one per prompt."""
    negative = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
    negative = negative * batch if len(negative) == 1 else negative
    if len(negative) != batch:
        raise ValueError(f"{len(negative)} negative prompts for {batch} prompts")
    return negative


@dataclass
class VideoCrafter2PipelineOutput(BaseOutput):
    """``frames``: uint8 ndarray (B, T, H, W, 3) for "np"; float tensor (B, 3, T, H, W) in [-1, 1] for "pt";
    latents (B, 4, T, H/8, W/8) for "latent"."""

    frames: np.ndarray | torch.Tensor


class VideoCrafter2Pipeline(DiffusionPipeline):
    """VideoCrafter2 text-to-video: ``pipe(prompt).frames``."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    # A folder converted without them (``convert --components``) loads with these None: pass them to from_pretrained
    # (``text_encoder=...``), or sample with ``prompt_embeds`` and ``output_type="latent"``.
    _optional_components = ["text_encoder", "vae"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: VideoCrafter2UNet,
        scheduler: VideoCrafter2DDIMScheduler,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        #: what the pipeline was loaded from ("tiny", a hub id, a path); set by ``customcrafter.loading``.
        self.base_model_id: str = ""
        #: frames per VAE decode call (1 = frame by frame, as the original; larger is faster on a GPU).
        self.decode_chunk_size: int = 1

    @property
    def _compute_device(self) -> torch.device:
        return self.unet.device

    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts → (B, 77, D) cross-attention context (penultimate block + ln_final), on the UNet's device/dtype."""
        embeds = _encode_prompt(self.tokenizer, self.text_encoder, prompts, device=self.text_encoder.device)
        # a copy (77 tokens: negligible) the caller may keep: under CUDA graphs (SpeedConfig.compile_mode=
        # "reduce-overhead") the encoder's own output is overwritten by its next replay
        return embeds.to(device=self._compute_device, dtype=self.unet.dtype, copy=True)

    def check_inputs(self, prompt, prompt_embeds, height, width, num_frames, num_inference_steps, output_type):
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        if num_frames < 1 or num_inference_steps < 1:
            raise ValueError(f"num_frames ({num_frames}) and num_inference_steps ({num_inference_steps}) must be >= 1")
        config = self.scheduler.config
        most = config.num_train_timesteps - getattr(config, "steps_offset", 0)
        if num_inference_steps > most:  # the schedule's timesteps would run past the trained ones
            raise ValueError(f"num_inference_steps ({num_inference_steps}) must be <= {most} "
                             f"(num_train_timesteps {config.num_train_timesteps} - steps_offset)")
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}: use 'np', 'pt' or 'latent'")

    def prepare_latents(self, batch, num_frames, height, width, generator, latents):
        shape = (batch, self.unet.config.in_channels, num_frames,
                 height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            # x_T ~ N(0, I); DDIM's init_noise_sigma is 1. Latents stay float32 between steps (schedule arithmetic);
            # only the UNet's input is cast to its dtype.
            return randn_tensor(shape, generator=generator, device=self._compute_device, dtype=torch.float32)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(device=self._compute_device, dtype=torch.float32)

    def _step_noise(self, generator, shape, num_steps: int, noise_sampler: NoiseSampler | None) -> NoiseSampler:
        """The η > 0 noise of every step, in sampling order: with CPU generators and an accelerator drawn by a
        ``HostStepNoise`` (close it after the loop), else step by step where the generator is."""
        device = self._compute_device
        if noise_sampler is not None:
            return lambda i, shape: noise_sampler(i, shape).to(device=device, dtype=torch.float32)
        generators = generator if isinstance(generator, list) else [generator]
        on_host = all(g is not None and g.device.type == "cpu" for g in generators)
        if device.type != "cpu" and on_host:
            return HostStepNoise(generator, shape, num_steps, device)
        return lambda i, shape: randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 12.0,
        eta: float = 1.0,
        fps: int = 28,
        num_frames: int = 16,
        height: int = 320,
        width: int = 512,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        on_step_begin: StepHook | None = None,
        noise_sampler: NoiseSampler | None = None,
        progress: bool = True,
        decode_chunk_size: int | None = None,
        return_dict: bool = True,
    ) -> VideoCrafter2PipelineOutput | tuple:
        """Generate videos.

        Args:
            prompt: text prompt(s), or pass ``prompt_embeds`` (B, L, D).
            negative_prompt: the unconditional prompt ("" as VideoCrafter2), or ``negative_prompt_embeds``.
            guidance_scale: classifier-free guidance g: ε = ε_u + g (ε_c − ε_u); ≤ 1 runs the conditional pass only.
            eta: DDIM η (1.0: VideoCrafter2's default, stochastic; 0: deterministic).
            fps: the UNet's frame-rate condition.
            generator: draws x_T and, for η > 0, each step's noise in sampling order.
            latents: x_T (B, 4, T, H/8, W/8) instead of drawing it.
            on_step_begin: ``hook(pipe, step_index, timestep)`` before each step.
            noise_sampler: ``fn(step_index, shape) -> Tensor``, the standard normal noise of each η > 0 step
                (replaces draws from ``generator``; used to replay recorded noise).
            decode_chunk_size: frames per VAE decode call (None: ``self.decode_chunk_size``).
            output_type: "np" (uint8 (B, T, H, W, 3)), "pt" (float (B, 3, T, H, W) in [-1, 1]) or "latent".
        """
        self.check_inputs(prompt, prompt_embeds, height, width, num_frames, num_inference_steps, output_type)
        device = self._compute_device

        # 1. text conditioning: (B, L, D) cond, and uncond broadcast to the batch
        do_cfg = guidance_scale > 1.0
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if do_cfg and negative_prompt_embeds is None:
                # both in one text-encoder pass (it is host-bound at these sizes: one pass costs what two do)
                negative = _negative_prompts(negative_prompt, len(prompts))
                negative_prompt_embeds, prompt_embeds = self.encode_prompt(negative + prompts).chunk(2)
            else:
                prompt_embeds = self.encode_prompt(prompts)
        prompt_embeds = prompt_embeds.to(device=device, dtype=self.unet.dtype)
        batch = prompt_embeds.shape[0]
        if do_cfg:
            if negative_prompt_embeds is None:
                negative_prompt_embeds = self.encode_prompt(_negative_prompts(negative_prompt, batch))
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=self.unet.dtype)
            if negative_prompt_embeds.shape[0] == 1 and batch > 1:
                negative_prompt_embeds = negative_prompt_embeds.expand(batch, -1, -1)
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} != prompt_embeds "
                                 f"{tuple(prompt_embeds.shape)}")
            # one UNet call per step on the (uncond, cond) contexts
            context = torch.cat([negative_prompt_embeds, prompt_embeds])
        else:
            context = prompt_embeds

        # 2. timesteps (kept on the CPU: no host-device sync inside the loop) and x_T
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps.tolist()
        latents = self.prepare_latents(batch, num_frames, height, width, generator, latents)
        fps_tensor = torch.full((batch,), fps, device=device, dtype=torch.long)
        step_noise = self._step_noise(generator, tuple(latents.shape), len(timesteps), noise_sampler) if eta > 0 \
            else None

        # 3. denoising loop
        try:
            for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling")):
                if on_step_begin is not None:
                    on_step_begin(self, i, t)
                # With CFG the latents go in once for both contexts: the UNet runs what sees no context (up to its
                # first cross-attention) once per latent, then repeats it for the (negative, positive) pair.
                model_input = latents.to(self.unet.dtype)
                t_batch = torch.full((batch,), t, device=device, dtype=torch.long)
                eps = self.unet(model_input, t_batch, context, fps=fps_tensor, return_dict=False)[0].float()
                if do_cfg:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                variance_noise = step_noise(i, tuple(latents.shape)) if step_noise is not None else None
                latents = self.scheduler.step(eps, t, latents, eta=eta, variance_noise=variance_noise,
                                              return_dict=False)[0]
        finally:
            if isinstance(step_noise, HostStepNoise):
                step_noise.close()

        # 4. decode
        if output_type == "latent":
            frames = latents
        else:
            video = decode_video(self.vae, latents, chunk_size=decode_chunk_size or self.decode_chunk_size)
            if output_type == "pt":
                frames = video.clamp(-1, 1)
            else:
                frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                frames = frames.permute(0, 2, 3, 4, 1).cpu().numpy()  # (B, T, H, W, 3)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return VideoCrafter2PipelineOutput(frames=frames)
