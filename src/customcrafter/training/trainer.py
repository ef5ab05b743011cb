"""One training loop for every subject-learning method (CustomCrafter, Custom Diffusion, DreamVideo).

Read top to bottom: :func:`train` resolves the subject, loads the base pipeline, adds the token, lets the method
(a :class:`~customcrafter.training.methods.SubjectMethod`) choose what learns, then runs each of the method's stages
with AdamW. One step = one instance clip + (prior preservation) one class clip, each its own forward pass:

    z0 = VAE posterior sample x 0.18215        t ~ U{0..999}        z_t = add_noise(z0, eps, t)  (VideoCrafter2 x0 scale)
    loss = L(eps, unet(z_t, t, text, fps)) [instance] + prior_weight x L(...) [class]

Runs on CPU, one GPU, or many via ``accelerate launch`` (DDP; the main process writes). The hot path has no host
sync: losses stay on the device and are read every ``log_every`` steps.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from customcrafter.training.checkpointing import (
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from customcrafter.training.config import TrainConfig
from customcrafter.training.dataset import SubjectDataset, resolve_subject
from customcrafter.training.methods import SPATIAL_BLOCK_RE, Stage, SubjectMethod, make_method

__all__ = ["TrainResult", "train", "DiffusionLoss", "detach_start_token_kv"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    module_dir: Path
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


# --- the loss ---------------------------------------------------------------------------------------------------
def epsilon_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """``l2``: mean squared error (paper). ``l1``: Σ|ε−ε̂|·mask / Σmask over all elements (reference code)."""
    if kind == "l2":
        return F.mse_loss(pred.float(), target.float())
    mask = mask.expand_as(pred).float()
    return ((pred.float() - target.float()).abs() * mask).sum() / mask.sum().clamp_min(1.0)


class DiffusionLoss(nn.Module):
    """The trainable graph as one module (what DDP wraps): text encoder + UNet; the VAE is a frozen helper."""

    def __init__(self, pipe, config: TrainConfig, encode_text_with_grad: bool = True):
        super().__init__()
        self.unet, self.text_encoder = pipe.unet, pipe.text_encoder
        self.__dict__["pipe"] = pipe  # not a submodule: the VAE and tokenizer are not part of what DDP syncs
        self.config = config
        self.encode_text_with_grad = encode_text_with_grad

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        from customcrafter.models.text import encode_prompt

        with torch.set_grad_enabled(self.encode_text_with_grad and torch.is_grad_enabled()):
            return encode_prompt(self.pipe.tokenizer, self.text_encoder, captions, device=self.unet.device)

    @torch.no_grad()
    def encode_clip(self, pixels: torch.Tensor) -> torch.Tensor:
        from customcrafter.models.vae import encode_video

        vae = self.pipe.vae
        return encode_video(vae, pixels.to(vae.device, vae.dtype), sample=True).to(torch.float32)

    def branch_loss(self, pixels: torch.Tensor, mask: torch.Tensor, captions: list[str]) -> torch.Tensor:
        latents = self.encode_clip(pixels)  # (B, 4, T, h, w), scaled
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.pipe.scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device)
        noisy = self.pipe.scheduler.add_noise(latents, noise, timesteps)
        text = self.encode_text(captions)
        fps = torch.full((latents.shape[0],), self.config.fps, device=latents.device, dtype=torch.long)
        pred = self.unet(noisy.to(self.unet.dtype), timesteps, encoder_hidden_states=text.to(self.unet.dtype),
                         fps=fps).sample
        return epsilon_loss(pred, noise, mask.to(pred.device), self.config.loss)

    def forward(self, batch: dict) -> torch.Tensor:
        instance = batch["instance"]
        loss = self.branch_loss(instance.pixels, instance.mask, instance.captions)
        if "class" in batch:
            prior = batch["class"]
            loss = loss + self.config.prior_weight * self.branch_loss(prior.pixels, prior.mask, prior.captions)
        return loss


@dataclass
class _Batch:
    pixels: torch.Tensor
    mask: torch.Tensor
    captions: list[str]


def _collate(batch: dict, device: torch.device) -> dict:
    return {k: _Batch(e.pixels[None].to(device), e.mask[None].to(device), [e.caption]) for k, e in batch.items()}


# --- helpers ------------------------------------------------------------------------------------------------------
def detach_start_token_kv(unet: nn.Module) -> list:
    """Custom Diffusion's trick: the start-of-text token's key/value in spatial cross-attention get no gradient.

    Forward hooks on ``attn2.to_k`` / ``attn2.to_v`` (LoRA wrappers included): same values, gradient stopped at
    position 0. Returns the hook handles (remove them after training).
    """
    import re

    handles = []

    def detach_first(module, args, output):
        return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)

    for name, module in unet.named_modules():
        if re.fullmatch(SPATIAL_BLOCK_RE + r"\.attn2\.(to_k|to_v)", name):
            handles.append(module.register_forward_hook(detach_first))
    return handles


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    cpu = config.device == "cpu" or (config.device is None and not torch.cuda.is_available())
    return Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)


def _stage_ranges(stages: list[Stage]) -> list[tuple[Stage, int, int]]:
    """(stage, first global step, end global step) for each stage."""
    ranges, start = [], 0
    for stage in stages:
        ranges.append((stage, start, start + stage.steps))
        start += stage.steps
    return ranges


def _flush(pending: list[torch.Tensor], losses: list[float]) -> None:
    if pending:
        losses.extend(torch.stack(pending).float().cpu().tolist())  # the one host sync, every log_every steps
        pending.clear()


def _resume(config: TrainConfig, method: SubjectMethod, dataset: SubjectDataset, total: int):
    checkpoints = Path(config.output_dir) / "checkpoints"
    path = latest_checkpoint(checkpoints) if config.resume else None
    if path is None:
        return 0, [], None
    checkpoint = load_checkpoint(path)
    if checkpoint.extra.get("method") != config.method:
        raise ValueError(f"{path}: checkpoint of method {checkpoint.extra.get('method')!r}, but this run trains "
                         f"{config.method!r} (use another output_dir or resume=false)")
    if checkpoint.step > total:
        raise ValueError(f"{path}: checkpoint at step {checkpoint.step} but this run has only {total} steps")
    method.load_trainable_state(checkpoint.trainable)
    restore_rng(checkpoint.rng["tensors"], checkpoint.rng["info"], dataset.rng)
    logger.info("resumed from %s (step %d of %d)", path, checkpoint.step, total)
    return checkpoint.step, checkpoint.losses, checkpoint


def _optimizer(params: list[nn.Parameter], stage: Stage, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=stage.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                             weight_decay=stage.weight_decay)


# --- the loop -----------------------------------------------------------------------------------------------------
def train(config: TrainConfig, *, pipe=None) -> TrainResult:
    """Train a subject module; returns where it was written, the per-step losses and the step count.

    ``pipe``: an already loaded base pipeline of ``config.base_model`` to train in place (tests, notebooks);
    by default it is loaded here.
    """
    from accelerate.utils import set_seed

    from customcrafter.loading import load_base_pipeline
    from customcrafter.subject_module import MODULE_SUBDIR, save_subject_module
    from customcrafter.training.class_images import resolve_class_images
    from customcrafter.training.tokens import add_placeholder_token, unsplice

    started = time.perf_counter()
    subject = resolve_subject(config.subject_dir, config.class_word, config.token, config.kind)
    accelerator = _make_accelerator(config)
    set_seed(config.seed)
    if pipe is None:
        pipe = load_base_pipeline(config.base_model, device=accelerator.device)
    with accelerator.main_process_first():
        class_images = resolve_class_images(config, pipe, subject.class_word) if config.prior_preservation else []
    set_seed(config.seed)  # class-image generation must not change what training draws

    method = make_method(config)
    token_id = add_placeholder_token(pipe.tokenizer, pipe.text_encoder, subject.token, subject.class_word,
                                     config.token_init)
    method.setup(pipe, [token_id])
    hooks = detach_start_token_kv(pipe.unet) if config.detach_sot_kv else []
    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        checkpointing = accelerator.device.type == "cuda"
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    dataset = SubjectDataset(subject, config, class_images)

    stages = method.stages()
    total = sum(s.steps for s in stages)
    start_step, losses, checkpoint = _resume(config, method, dataset, total)
    model = DiffusionLoss(pipe, config)
    checkpoints_dir = Path(config.output_dir) / "checkpoints"
    progress = tqdm(total=total, initial=start_step, desc=f"train {config.method}", unit="step",
                    disable=not accelerator.is_local_main_process)
    pending: list[torch.Tensor] = []
    try:
        for stage, first, end in _stage_ranges(stages):
            if end <= start_step:
                continue
            params = method.begin_stage(stage)
            model.encode_text_with_grad = stage.train_token
            optimizer = _optimizer(params, stage, config)
            if checkpoint is not None and checkpoint.extra.get("stage") == stage.name and start_step > first:
                optimizer.load_state_dict(checkpoint.optimizer)
            trained, optimizer = accelerator.prepare(model, optimizer)
            trained.train()
            for step in range(max(first, start_step), end):
                batch = _collate(dataset.next_batch(), accelerator.device)
                with accelerator.autocast():
                    loss = trained(batch)
                accelerator.backward(loss)
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                pending.append(loss.detach())
                progress.update(1)
                done = step + 1
                if done % config.log_every == 0 or done == end:
                    _flush(pending, losses)
                    progress.set_postfix(stage=stage.name, loss=f"{losses[-1]:.4f}")
                if config.checkpoint_every and done % config.checkpoint_every == 0 and done < total:
                    _flush(pending, losses)
                    if accelerator.is_main_process:
                        save_checkpoint(checkpoints_dir, done, method.trainable_state(), optimizer.state_dict(),
                                        dataset.rng, losses, {"method": config.method, "stage": stage.name},
                                        keep=config.keep_checkpoints)
                    accelerator.wait_for_everyone()
            model = accelerator.unwrap_model(trained)
            accelerator.free_memory()
        _flush(pending, losses)
    finally:
        progress.close()
        for handle in hooks:
            handle.remove()

    if losses and math.isnan(losses[-1]):
        raise FloatingPointError("training loss became NaN; lower the learning rate or use fp32")
    module_dir = Path(config.output_dir) / MODULE_SUBDIR
    if accelerator.is_main_process:
        if checkpointing:
            pipe.unet.disable_gradient_checkpointing()
        unsplice(pipe.text_encoder)
        save_subject_module(module_dir, method=method, pipe=pipe, subject=subject, config=config,
                            token_id=token_id)
        (Path(config.output_dir) / "losses.json").write_text(json.dumps(losses))
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    logger.info("trained %s for %d steps in %.1fs (final loss %.4f)", config.method, total, seconds,
                losses[-1] if losses else float("nan"))
    return TrainResult(module_dir=module_dir, losses=losses, steps=total, seconds=seconds)
