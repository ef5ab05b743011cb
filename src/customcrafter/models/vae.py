"""VideoCrafter2's VAE: Stable Diffusion's image ``AutoencoderKL`` applied frame by frame, latents scaled by 0.18215.

The original encodes and decodes a video one frame at a time (``encode_first_stage``/``decode_first_stage`` loop over
frames); ``chunk_size`` > 1 processes several frames per call (same result, more memory).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

SCALING_FACTOR = 0.18215


def vae_config(
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512), layers_per_block: int = 2, latent_channels: int = 4
) -> dict:
    """``AutoencoderKL`` config for an LDM first-stage model (defaults: VideoCrafter2's, = Stable Diffusion's)."""
    n = len(block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": 32,
        "scaling_factor": SCALING_FACTOR,
        "sample_size": 256,
    }


def _frames(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) → (B*T, C, H, W), frame-major within each video."""
    b, c, t, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _video(frames: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*T, C, H, W) → (B, C, T, H, W)."""
    bt, c, h, w = frames.shape
    return frames.reshape(batch, bt // batch, c, h, w).permute(0, 2, 1, 3, 4)


def encode_video(
    vae: AutoencoderKL,
    video: torch.Tensor,
    sample: bool = True,
    generator: torch.Generator | None = None,
    chunk_size: int = 1,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Video (B, 3, T, H, W) in [-1, 1] → scaled latents (B, 4, T, H/8, W/8).

    ``sample=True`` draws from the posterior (training, as the original); False takes its mean.
    ``noise``: optional standard-normal tensor shaped like the latents (B, C, T, h, w); the posterior sample is then
    ``mean + std · noise`` (``latent_dist.sample``'s formula) instead of a draw from ``generator``, so the caller owns
    the randomness (the trainer draws it per example). Needs ``sample=True``.
    """
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(video.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if noise is not None and not sample:
        raise ValueError("noise is the posterior sample's noise: it needs sample=True")
    frames = _frames(video.to(device=vae.device, dtype=vae.dtype))
    if noise is not None:
        if noise.ndim != 5 or noise.shape[0] != video.shape[0] or noise.shape[2] != video.shape[2]:
            raise ValueError(f"noise must be (B, C, T, h, w) for video {tuple(video.shape)}, got {tuple(noise.shape)}")
        noise_frames = _frames(noise.to(device=vae.device, dtype=vae.dtype)).split(chunk_size)
    latents = []
    for index, chunk in enumerate(frames.split(chunk_size)):
        posterior = vae.encode(chunk).latent_dist
        if not sample:
            latents.append(posterior.mean)
        elif noise is None:
            latents.append(posterior.sample(generator=generator))
        else:
            if noise_frames[index].shape != posterior.mean.shape:
                raise ValueError(f"noise frames {tuple(noise_frames[index].shape)} do not match the latent frames "
                                 f"{tuple(posterior.mean.shape)}")
            latents.append(posterior.mean + posterior.std * noise_frames[index])
    return _video(torch.cat(latents), video.shape[0]) * vae.config.scaling_factor


def still_image_moments(vae: AutoencoderKL, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and standard deviation, each (B, 4, h, w), of images ``frame`` (B, 3, H, W) or
    (B, 3, 1, H, W) in [-1, 1]: all a still clip's latents need (:func:`still_clip_latents`)."""
    if frame.ndim == 5:
        if frame.shape[2] != 1:
            raise ValueError(f"a still clip's image is one frame, got {tuple(frame.shape)}")
        frame = frame[:, :, 0]
    if frame.ndim != 4 or frame.shape[1] != 3:
        raise ValueError(f"frame must be (B, 3, H, W), got {tuple(frame.shape)}")
    posterior = vae.encode(frame.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean, posterior.std


def still_clip_latents(vae: AutoencoderKL, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, T, h, w) of still clips from their image's posterior ``mean``/``std`` (B, 4, h, w):
    frame t's latent is ``mean + std · noise[:, :, t]`` (``noise``: (B, 4, T, h, w) standard normal)."""
    if noise.ndim != 5 or noise.shape[0] != mean.shape[0]:
        raise ValueError(f"noise must be (B, C, T, h, w) for {mean.shape[0]} frames, got {tuple(noise.shape)}")
    mean, std = mean.unsqueeze(2), std.unsqueeze(2)  # (B, 4, 1, h, w)
    if mean.shape[:2] + mean.shape[3:] != noise.shape[:2] + noise.shape[3:]:
        raise ValueError(f"noise {tuple(noise.shape)} does not match the latents {tuple(mean.shape)}")
    return (mean + std * noise.to(device=mean.device, dtype=mean.dtype)) * vae.config.scaling_factor


def encode_still_clip(vae: AutoencoderKL, frame: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A still clip (one image repeated over T frames) → scaled latents (B, 4, T, h, w), encoding the image once.

    ``frame``: (B, 3, H, W) or (B, 3, 1, H, W) in [-1, 1]; ``noise``: (B, 4, T, h, w) standard normal. Frame t's
    latent is ``mean + std · noise[:, :, t]``: exactly what encoding the T identical frames one by one gives, for
    1/T of the encoder's work (training clips are still clips).
    """
    return still_clip_latents(vae, *still_image_moments(vae, frame), noise)


def decode_video(vae: AutoencoderKL, latents: torch.Tensor, chunk_size: int = 1) -> torch.Tensor:
    """Scaled latents (B, 4, T, h, w) → video (B, 3, T, 8h, 8w), nominally in [-1, 1] (not clamped)."""
    if latents.ndim != 5:
        raise ValueError(f"latents must be (B, C, T, h, w), got {tuple(latents.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    frames = _frames(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor)
    decoded = None
    for start in range(0, frames.shape[0], chunk_size):
        out = vae.decode(frames[start:start + chunk_size]).sample
        if decoded is None:
            decoded = out.new_empty((frames.shape[0],) + out.shape[1:])
        # copied out before the next chunk runs: under CUDA graphs (SpeedConfig.compile_mode="reduce-overhead") a
        # replay overwrites the previous replay's output
        decoded[start:start + out.shape[0]] = out
    return _video(decoded, latents.shape[0])
