"""VideoCrafter2's UNet: diffusers' ``UNet3DConditionModel`` plus the fps embedding, peft adapters and
gradient checkpointing.

``UNet3DConditionModel`` already has VideoCrafter2's topology (ResBlock → temporal conv → spatial transformer →
temporal transformer per layer, and the extra temporal transformer ``transformer_in`` after ``conv_in``). What it
lacks, and what this subclass adds:

* **fps conditioning** (VideoCrafter2's ``fps_cond``): the frame rate goes through the same sinusoidal embedding as
  the timestep, then ``Linear → SiLU → Linear``, and is *added* to the timestep embedding before it is repeated per
  frame. fps stays an input of ``forward`` (never folded into a bias), so one model serves any frame rate.
* **peft adapters** through diffusers' ``PeftAdapterMixin`` (``add_adapter``, ``set_adapters``, ``delete_adapters``,
  ``fuse_lora``/``unfuse_lora`` …), which the base class does not inherit.
* **gradient checkpointing** of the down, mid and up blocks (the base class declares no support).
* **the text context once per video** where ``context_per_video`` is set (``performance.use_video_context_attention``:
  only the spatial cross-attentions read it, and theirs then take it per video); else it is repeated per frame.

Note on head sizes: despite its name, the base class's ``attention_head_dim`` (an int) is the *width of each head*
everywhere in this UNet (level with C channels: C // attention_head_dim heads; ``transformer_in``: 8 heads of that
width), which is exactly the original's ``num_head_channels`` (64 for VideoCrafter2, 16 for the tiny model).

``forward`` is overridden because the base forward has no hook for an extra embedding or for checkpointing; it
follows the base forward step by step.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.utils.checkpoint
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding

# DiffusionPipeline.from_pretrained finds a component's base class (its load method) in the component's module.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.unets.unet_3d_blocks import CrossAttnDownBlock3D
from diffusers.models.unets.unet_3d_condition import UNet3DConditionModel, UNet3DConditionOutput

#: fps used when ``forward`` gets ``fps=None``: the frame rate VideoCrafter2 is sampled with (its inference
#: scripts pass 28). The original UNet's own keyword default is 16 (what CustomCrafter trains with): callers that
#: want that pass it explicitly.
DEFAULT_FPS = 28


class VideoCrafter2UNet(UNet3DConditionModel, PeftAdapterMixin):
    """UNet3DConditionModel + fps embedding (VideoCrafter2), peft adapters and gradient checkpointing.

    Extra config arguments (all others are ``UNet3DConditionModel``'s, whose defaults are VideoCrafter2's sizes):
        fps_cond: add the fps embedding (VideoCrafter2: True). With False the model is the plain base UNet.
    """

    _supports_gradient_checkpointing = True
    #: True when every cross-attention takes one context per video (``performance.use_video_context_attention``
    #: sets it): ``forward`` then passes ``encoder_hidden_states`` as given instead of repeating it per frame.
    context_per_video: bool = False

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "DownBlock3D",
        ),
        up_block_types: tuple[str, ...] = ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1024,
        attention_head_dim: int = 64,
        num_attention_heads: int | tuple[int, ...] | None = None,
        time_cond_proj_dim: int | None = None,
        fps_cond: bool = True,
    ):
        if not isinstance(attention_head_dim, int):
            raise ValueError(f"attention_head_dim={attention_head_dim!r}: one head width (int) for all levels")
        super().__init__(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            downsample_padding=downsample_padding, mid_block_scale_factor=mid_block_scale_factor, act_fn=act_fn,
            norm_num_groups=norm_num_groups, norm_eps=norm_eps, cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            time_cond_proj_dim=time_cond_proj_dim,
        )
        if fps_cond:
            # fps sinusoid (block_out_channels[0]) -> Linear -> SiLU -> Linear (time_embed_dim), as the original.
            self.fps_embedding = TimestepEmbedding(block_out_channels[0], block_out_channels[0] * 4, act_fn=act_fn)
        self.gradient_checkpointing = False
        self._custom_checkpointing = False

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        """As diffusers'; without a function of the caller's, blocks run under torch's non-reentrant checkpoint with
        their keyword arguments passed through (see :meth:`_run_block`)."""
        super().enable_gradient_checkpointing(gradient_checkpointing_func)
        self._custom_checkpointing = gradient_checkpointing_func is not None

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None) -> None:
        """Checkpoint whole down/mid/up blocks (in ``forward``). The inner transformers' own checkpointing stays off:
        nested checkpoints would recompute their layers twice in the backward pass."""
        self.gradient_checkpointing = enable
        if gradient_checkpointing_func is not None:
            self._gradient_checkpointing_func = gradient_checkpointing_func

    def _run_block(self, block: torch.nn.Module, *tensors: Any, **options: Any) -> Any:
        """Run a down/mid/up block, under activation checkpointing when enabled and training."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            if self._custom_checkpointing:  # diffusers' signature, (module, *args): options bound beforehand
                return self._gradient_checkpointing_func(functools.partial(block, **options), *tensors)
            # What diffusers' default does (non-reentrant torch.utils.checkpoint), with the keyword arguments given
            # to checkpoint itself: torch.compile cannot trace a functools.partial's __call__ there, and would run
            # the whole UNet eagerly.
            return torch.utils.checkpoint.checkpoint(block, *tensors, use_reentrant=False, **options)
        return block(*tensors, **options)

    def fps_embed(self, fps: torch.Tensor | int | float | None, batch: int, device: torch.device) -> torch.Tensor:
        """fps (scalar or (B,)) → (B, time_embed_dim), the sinusoid shared with the timestep embedding → MLP."""
        if fps is None:
            fps = DEFAULT_FPS
        if not torch.is_tensor(fps):
            fps = torch.tensor([fps], device=device)
        fps = fps.reshape(-1).to(device).expand(batch)
        return self.fps_embedding(self.time_proj(fps).to(dtype=self.dtype))

    def _context_free_prefix(self, sample: torch.Tensor, emb: torch.Tensor, num_frames: int, repeats: int):
        """One latent for ``repeats`` contexts: the first down block's first resnet and temporal convolution (they
        see no context) run once per latent; then everything is repeated for the contexts. Returns the activations,
        the first skip connection (``transformer_in``'s output) and the time embedding, all repeated, and whether
        the first layer's resnet and temporal convolution ran (not under gradient checkpointing, which checkpoints
        whole blocks)."""
        block = self.down_blocks[0]
        skip = sample.repeat(repeats, 1, 1, 1)
        done = isinstance(block, CrossAttnDownBlock3D) and not (torch.is_grad_enabled() and self.gradient_checkpointing)
        if done:
            sample = block.temp_convs[0](block.resnets[0](sample, emb), num_frames=num_frames)
        return sample.repeat(repeats, 1, 1, 1), skip, emb.repeat(repeats, 1), done

    @staticmethod
    def _rest_of_first_block(block, sample, emb, encoder_hidden_states, num_frames, cross_attention_kwargs):
        """``CrossAttnDownBlock3D.forward`` from its first spatial transformer on (its first resnet and temporal
        convolution ran in ``_context_free_prefix``)."""
        output_states = ()
        for index, (resnet, temp_conv, attn, temp_attn) in enumerate(
            zip(block.resnets, block.temp_convs, block.attentions, block.temp_attentions, strict=True)
        ):
            if index:
                sample = temp_conv(resnet(sample, emb), num_frames=num_frames)
            sample = attn(sample, encoder_hidden_states=encoder_hidden_states,
                          cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]
            sample = temp_attn(sample, num_frames=num_frames, cross_attention_kwargs=cross_attention_kwargs,
                               return_dict=False)[0]
            output_states += (sample,)
        if block.downsamplers is not None:
            for downsampler in block.downsamplers:
                sample = downsampler(sample)
            output_states += (sample,)
        return sample, output_states

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        fps: torch.Tensor | int | float | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet3DConditionOutput | tuple[torch.Tensor]:
        """ε prediction.

        Args:
            sample: noisy latents (B, C, T, H, W); or (B/k, C, T, H, W), one latent for k contexts each, as in
                classifier-free guidance (the same latents with the negative and with the positive prompt). Then
                what sees no context (``conv_in``, ``transformer_in``, the first resnet and temporal convolution)
                runs once per latent and is repeated, as if ``sample`` were ``sample.repeat(k, 1, 1, 1, 1)``;
                ``timestep`` and ``fps`` are then per latent.
            timestep: scalar or (B,) diffusion timesteps.
            encoder_hidden_states: text embeddings (B, L, D).
            fps: frame-rate condition, scalar or (B,); None means ``DEFAULT_FPS`` (28, VideoCrafter2's sampling
                rate). Ignored when the model was built with ``fps_cond=False``.
            Other arguments as in ``UNet3DConditionModel.forward``.

        Returns:
            ``UNet3DConditionOutput(sample)`` with ``sample`` (B, C_out, T, H, W), or a 1-tuple.
        """
        batch, _, num_frames, height, width = sample.shape
        repeats, remainder = divmod(encoder_hidden_states.shape[0], batch)
        if remainder or not repeats:
            raise ValueError(f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]}: not a multiple of "
                             f"the sample's batch {batch}")
        up_factor = 2**self.num_upsamplers
        # Odd sizes: force the upsamplers to the skip connection's size (as the base class does).
        forward_upsample_size = height % up_factor != 0 or width % up_factor != 0
        upsample_size = None

        if attention_mask is not None:
            attention_mask = (1 - attention_mask.to(sample.dtype)) * -10000.0
            attention_mask = attention_mask.unsqueeze(1)

        # 1. time (+ fps): (B, time_embed_dim), then repeated per frame → (B*T, time_embed_dim)
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            if sample.device.type == "mps":
                dtype = torch.float32 if dtype == torch.float64 else torch.int32
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        timesteps = timesteps.reshape(-1).to(sample.device).expand(batch)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype), timestep_cond)
        if self.config.fps_cond:
            emb = emb + self.fps_embed(fps, batch, sample.device)
        emb = emb.repeat_interleave(num_frames, dim=0, output_size=batch * num_frames)
        if not self.context_per_video:  # else the cross-attentions take each video's context for all its frames
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(
                num_frames, dim=0, output_size=encoder_hidden_states.shape[0] * num_frames
            )

        # 2. pre-process: (B, C, T, H, W) → (B*T, C, H, W)
        sample = sample.permute(0, 2, 1, 3, 4).reshape((batch * num_frames, -1) + sample.shape[3:])
        sample = self.conv_in(sample)
        sample = self.transformer_in(
            sample, num_frames=num_frames, cross_attention_kwargs=cross_attention_kwargs, return_dict=False
        )[0]

        # 3. down
        first_layer_done = False
        if repeats > 1:
            sample, skip, emb, first_layer_done = self._context_free_prefix(sample, emb, num_frames, repeats)
        else:
            skip = sample
        down_block_res_samples = (skip,)
        for index, block in enumerate(self.down_blocks):
            if index == 0 and first_layer_done:
                sample, res_samples = self._rest_of_first_block(
                    block, sample, emb, encoder_hidden_states, num_frames, cross_attention_kwargs
                )
            elif getattr(block, "has_cross_attention", False):
                sample, res_samples = self._run_block(
                    block, sample, emb, encoder_hidden_states, attention_mask,
                    num_frames=num_frames, cross_attention_kwargs=cross_attention_kwargs,
                )
            else:
                sample, res_samples = self._run_block(block, sample, emb, num_frames=num_frames)
            down_block_res_samples += res_samples

        if down_block_additional_residuals is not None:
            down_block_res_samples = tuple(
                res + extra for res, extra in zip(down_block_res_samples, down_block_additional_residuals, strict=True)
            )

        # 4. mid
        if self.mid_block is not None:
            sample = self._run_block(
                self.mid_block, sample, emb, encoder_hidden_states, attention_mask,
                num_frames=num_frames, cross_attention_kwargs=cross_attention_kwargs,
            )
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual

        # 5. up
        for i, block in enumerate(self.up_blocks):
            res_samples = down_block_res_samples[-len(block.resnets):]
            down_block_res_samples = down_block_res_samples[: -len(block.resnets)]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = down_block_res_samples[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                sample = self._run_block(
                    block, sample, res_samples, emb, encoder_hidden_states,
                    upsample_size=upsample_size, attention_mask=attention_mask, num_frames=num_frames,
                    cross_attention_kwargs=cross_attention_kwargs,
                )
            else:
                sample = self._run_block(
                    block, sample, res_samples, emb, upsample_size=upsample_size, num_frames=num_frames
                )

        # 6. post-process: (B*T, C, H, W) → (B, C, T, H, W)
        if self.conv_norm_out is not None:
            sample = self.conv_act(self.conv_norm_out(sample))
        sample = self.conv_out(sample)
        sample = sample.reshape((batch * repeats, num_frames) + sample.shape[1:]).permute(0, 2, 1, 3, 4)

        if not return_dict:
            return (sample,)
        return UNet3DConditionOutput(sample=sample)
