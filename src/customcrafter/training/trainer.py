"""One training loop for every subject-learning method (CustomCrafter, Custom Diffusion, DreamVideo).

Read top to bottom: :func:`train` resolves the subject, loads the base pipeline, adds the token, lets the method
(a :class:`~customcrafter.training.methods.SubjectMethod`) choose what learns, then runs each of the method's stages
with AdamW. One step = a global batch of ``per_device_batch_size`` x processes instance clips + (prior preservation)
as many class clips; each process runs its slice, instance and class clips through the UNet as one batch:

    z0 = VAE posterior sample x 0.18215        t ~ U{0..999}        z_t = add_noise(z0, eps, t)  (VideoCrafter2 x0 scale)
    loss = mean over the slice of L(eps, unet(z_t, t, text, fps)) [instance] + prior_weight x the same [class]

DDP averages the gradients over processes, so a step follows the mean loss over the global batch whatever its split.
Every clip's randomness - posterior sample, eps, t, and the UNet's dropout masks (:class:`ExampleDropout`) - comes
from its own seed, a function of (seed, step, index in the global batch, branch) (:func:`example_seed`), and the
dataset draws the whole global batch in every process, so 2 processes x batch 1 train what 1 process x batch 2
trains, up to float summation order (tested on CPU with gloo).

Runs on CPU, one GPU, or many via ``accelerate launch`` (DDP; the main process writes). The hot path has no host
sync: inputs go to the GPU from pinned memory without blocking, losses stay on the device and are read (averaged
over processes) every ``log_every`` steps.
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
from torch.profiler import record_function
from tqdm.auto import tqdm

from customcrafter.training.checkpointing import (
    latest_checkpoint,
    load_checkpoint,
    remove_checkpoints,
    restore_rng,
    save_checkpoint,
)
from customcrafter.training.config import TrainConfig
from customcrafter.training.dataset import SubjectDataset, resolve_subject
from customcrafter.training.methods import SPATIAL_BLOCK_RE, Stage, SubjectMethod, make_method
from customcrafter.utils import file_in_the_way

__all__ = ["TrainResult", "train", "DiffusionLoss", "use_cuda_graphs", "ExampleDropout", "detach_start_token_kv",
           "epsilon_loss", "example_seed", "draw_example_noise", "install_example_dropout", "restore_dropout",
           "run_fingerprint"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """``losses``: per step, the mean over the global batch (averaged over processes). ``step_seconds``: for each
    log interval of this run (``log_every`` steps, shorter at stage ends and checkpoints), its wall seconds / its
    steps - the first includes warm-up; checkpoint writing is not counted."""

    module_dir: Path
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    schedule: dict = field(default_factory=dict)  # what ran: see :func:`run_schedule`


def run_schedule(stages, processes: int, global_batch: int) -> dict:
    """What a run resolved (a learning rate may depend on the global batch; the config says None): recorded in the
    module, the result and the tracking run."""
    return {"processes": processes, "global_batch": global_batch,
            "stages": [{"name": s.name, "steps": s.steps, "lr": s.lr} for s in stages]}


# --- the loss ---------------------------------------------------------------------------------------------------
def epsilon_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """The mean over the batch of per-example losses (so any split of a global batch over processes, whose gradients
    DDP averages, gives the same step). ``l2``: mean squared error (paper; all examples have the same size, so this
    is the plain mean). ``l1``: per example Σ|ε−ε̂|·mask / Σmask (reference code, which trains batch 1 per GPU).
    ``l2_masked``: per example Σ(ε−ε̂)²·mask / Σmask (Custom Diffusion); with an all-ones mask (class clips, images
    not zoomed out) it equals ``l2``."""
    if kind == "l2":
        return F.mse_loss(pred.float(), target.float())
    mask = mask.expand_as(pred).float()
    dims = tuple(range(1, pred.ndim))
    error = pred.float() - target.float()
    error = error.abs() if kind == "l1" else error.square()
    per_example = (error * mask).sum(dims) / mask.sum(dims).clamp_min(1.0)
    return per_example.mean()


_BRANCHES = ("instance", "class")
# Posteriors of keyed images kept per run (config.cache_image_moments): 4,096 is 20x the paper's 200 class images;
# at 320 x 512 an entry holds 2 x 4 x 40 x 64 values (at most 80 KiB), so at most ~330 MiB of GPU memory.
MAX_CACHED_IMAGE_MOMENTS = 4096
_MASK64 = (1 << 64) - 1


def _mix(seed: int, value: int) -> int:
    """splitmix64 of ``seed`` and ``value``: a well-spread 63-bit seed (cheap enough to call per layer and example)."""
    z = (seed + 0x9E3779B97F4A7C15 * (value + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def example_seed(seed: int, step: int, index: int, branch: str) -> int:
    """The seed of one example's randomness: a function of (run seed, global step, index in the global batch,
    branch) only - not of the process that trains the example nor of its batch neighbours."""
    return _mix(_mix(_mix(seed % 2**64, step), index), _BRANCHES.index(branch))


def draw_example_noise(seed: int, latent_shape: tuple[int, ...],
                       num_timesteps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(timestep t, posterior noise, ε) of one example, in this order from a CPU generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    timestep = torch.randint(0, num_timesteps, (), generator=generator)
    posterior = torch.randn(latent_shape, generator=generator)
    noise = torch.randn(latent_shape, generator=generator)
    return timestep, posterior, noise


def _dropout_mask(seed: int, index: int, shape: tuple[int, ...], p: float, device: torch.device,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The keep-mask (bool) of one example at dropout layer ``index``: a function of (example seed, layer) only."""
    generator = torch.Generator(device=device).manual_seed(_mix(seed, index))
    return torch.lt(torch.rand(shape, generator=generator, device=device), 1.0 - p, out=out)


class _ExampleSeeds:
    """The example seeds of the batch in the UNet now (set before each forward; still valid when gradient
    checkpointing re-runs the forward during backward), and the dropout layers that draw from them.

    With ``static`` on (CUDA graphs, ``torch.compile``), each layer keeps its masks in one fixed tensor
    (:attr:`ExampleDropout.mask`), drawn by the first forward and refilled in place by :meth:`set` before every later
    step: a captured graph reads them from the same address every replay, and compiled code reads a tensor - it
    never traces the seeds or the layer's index, which would recompile every layer at every step. Eager runs draw the
    same masks inside the forward.
    """

    def __init__(self) -> None:
        self.current: list[int] | None = None
        self.static = False
        self.layers: list[ExampleDropout] = []

    def set(self, seeds: list[int]) -> None:
        self.current = list(seeds)
        if not self.static:
            return
        for layer in self.layers:
            mask = layer.mask
            if mask is None:
                continue
            if mask.shape[0] % len(seeds):
                raise RuntimeError(f"dropout layer {layer.index}: {mask.shape[0]} rows do not split over "
                                   f"{len(seeds)} examples (the batch layout changed after capture)")
            layer.fill(mask, seeds)

    def use_static_masks(self, enabled: bool) -> None:
        """Switch fixed mask tensors on or off; either way the layers' masks are drawn anew by the next forward."""
        self.static = enabled
        for layer in self.layers:
            layer.mask = None

    def ensure_masks(self, forward, always: bool = False) -> None:
        """Static mode: if a layer has no fixed masks yet (or ``always``), run ``forward()`` (the UNet on this step's
        inputs) once, eagerly and without grad, to draw them - outside any CUDA-graph capture, and without compiling
        an inference graph of what is compiled."""
        if always or (self.static and any(layer.mask is None for layer in self.layers)):
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                forward()


class ExampleDropout(nn.Module):
    """``nn.Dropout`` whose mask for each example of the batch comes from that example's seed and this layer's index,
    so it does not depend on the batch layout (the UNet's temporal-conv dropout, p = 0.1 as in VideoCrafter2, is
    active in training). Rows of the input are batch-major: (B, ...) or (B·F, ...)."""

    def __init__(self, p: float, index: int, seeds: _ExampleSeeds):
        super().__init__()
        self.p, self.index, self.seeds = p, index, seeds
        self.mask: torch.Tensor | None = None  # static mode: this step's keep-mask of every example (bool)
        seeds.layers.append(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        mask = self.mask
        if mask is None or mask.shape != x.shape:
            mask = self._draw(x)
            if mask is None:  # no example seeds set: plain dropout
                return F.dropout(x, self.p, training=True)
        return x * mask.to(x.dtype) / (1.0 - self.p)

    @torch.compiler.disable
    def _draw(self, x: torch.Tensor) -> torch.Tensor | None:
        """The batch's keep-mask from the example seeds (kept as :attr:`mask` in static mode); None without seeds.
        Never traced: compiled code must not depend on the seeds or the index."""
        seeds = self.seeds.current
        if not seeds:
            return None
        if x.shape[0] % len(seeds):
            raise RuntimeError(f"dropout input {tuple(x.shape)} is not batch-major over {len(seeds)} examples")
        mask = self.fill(torch.empty(x.shape, dtype=torch.bool, device=x.device), seeds)
        if self.seeds.static:
            self.mask = mask
        return mask

    def fill(self, mask: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Write each example's keep-mask into its rows of ``mask`` (batch-major, rows divisible by the seeds)."""
        rows = mask.shape[0] // len(seeds)
        for j, seed in enumerate(seeds):
            _dropout_mask(seed, self.index, (rows, *mask.shape[1:]), self.p, mask.device,
                          out=mask[j * rows:(j + 1) * rows])
        return mask


def install_example_dropout(unet: nn.Module) -> tuple[_ExampleSeeds, list]:
    """Replace each active ``nn.Dropout`` of ``unet`` by an :class:`ExampleDropout`; returns the seed holder and
    what :func:`restore_dropout` needs to put the originals back."""
    seeds, replaced = _ExampleSeeds(), []
    found = [(name, module) for name, module in unet.named_modules()
             if type(module) is nn.Dropout and module.p > 0]
    for index, (name, module) in enumerate(found):
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, ExampleDropout(module.p, index, seeds))
        replaced.append((parent, child, module))
    return seeds, replaced


def restore_dropout(replaced: list) -> None:
    for parent, child, module in replaced:
        setattr(parent, child, module)


def use_cuda_graphs(config: TrainConfig, device: torch.device, num_processes: int = 1) -> bool:
    """``config.cuda_graphs`` resolved: never off CUDA; None = on for single-process CUDA training, compiled or not
    (with compile the graphs replay the compiled forward and backward: the measured fast path, benchmarks/RESULTS.md)."""
    if device.type != "cuda":
        if config.cuda_graphs:
            logger.warning("cuda_graphs applies on CUDA only; training eagerly on %s", device.type)
        return False
    if config.cuda_graphs is None:
        return num_processes == 1
    return config.cuda_graphs


def _has_compiled_parts(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule of it is compiled (``Module.compile`` in place, or ``torch.compile``'s
    wrapper)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(getattr(m, "_compiled_call_impl", None) is not None or isinstance(m, OptimizedModule)
               for m in module.modules())


class _UNetCall(nn.Module):
    """The UNet as a function of tensors only (what CUDA-graph capture takes)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timesteps, text, fps):
        return self.unet(sample, timesteps, encoder_hidden_states=text, fps=fps).sample


class _TextCall(nn.Module):
    """Token ids → cross-attention context (``models.text.encode_tokens``), tensors only."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        from customcrafter.models.text import encode_tokens

        return encode_tokens(self.text_encoder, input_ids)


class DiffusionLoss(nn.Module):
    """The trainable graph as one module (what DDP wraps): text encoder + UNet; the VAE is a frozen helper.

    Instance and class clips of a process's slice go through the UNet as one batch; the loss is the mean over the
    slice of instance + ``prior_weight`` x class.

    With ``config.cuda_graphs`` on CUDA, the text encoder's and the UNet's forward + backward are captured as CUDA
    graphs at the first step of a stage (:meth:`reset_graphs` between stages) and replayed afterwards: a step then
    launches two graphs instead of ~10,000 kernels. Inputs are copied into the graphs' static buffers; the dropout
    masks are refilled in place (:class:`_ExampleSeeds`).
    """

    def __init__(self, pipe, config: TrainConfig, encode_text_with_grad: bool = True,
                 dropout_seeds: _ExampleSeeds | None = None, num_processes: int = 1):
        super().__init__()
        self.unet, self.text_encoder = pipe.unet, pipe.text_encoder
        self.__dict__["pipe"] = pipe  # not a submodule: the VAE and tokenizer are not part of what DDP syncs
        self.config = config
        self.encode_text_with_grad = encode_text_with_grad
        self.dropout_seeds = dropout_seeds or _ExampleSeeds()
        self.use_cuda_graphs = use_cuda_graphs(config, self.unet.device, num_processes)
        # compiled code must read fixed mask tensors (see _ExampleSeeds)
        self.compiled = _has_compiled_parts(self.unet)
        self.__dict__["_image_moments"] = {}  # Example.image_key -> VAE posterior (mean, std), on the device
        self.reset_graphs()

    def reset_graphs(self) -> None:
        """Drop captured graphs (a new stage changes what learns); the next step captures again. The call wrappers
        are made anew: capture replaces their ``forward``. Plain attributes, not submodules (the UNet and the text
        encoder already are)."""
        self.__dict__["_calls"] = {"text": _TextCall(self.text_encoder), "unet": _UNetCall(self.unet)}
        self.__dict__["_graphed"] = {}
        self.dropout_seeds.use_static_masks(self.use_cuda_graphs or self.compiled)

    def _call(self, name: str, *args: torch.Tensor) -> torch.Tensor:
        call = self._calls[name]
        if not self.use_cuda_graphs:
            if name == "unet":
                self.dropout_seeds.ensure_masks(lambda: call(*args))
            return call(*args)
        graphed = self._graphed.get(name)
        if graphed is None:
            graphed = self._graphed[name] = self._capture(call, args)
        return graphed(*args)

    def _capture(self, call: nn.Module, args: tuple[torch.Tensor, ...]):
        """Capture ``call``'s forward and backward (``torch.cuda.make_graphed_callables``). Autocast, if on, is kept
        with its weight-cast cache off (a cache cannot live across graph replays). A first forward without grad, on
        the capture's own sample inputs and under that autocast, draws the dropout masks (:meth:`_ExampleSeeds.
        ensure_masks`, eagerly) outside the capture; compiled parts compile in the warm-up iterations, before it."""
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        # Capture from detached leaf copies: were a sample argument the text encoder's output itself, the capture of
        # the backward would reach into the text encoder's graph (recorded outside the capture) and fail.
        samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
            self.dropout_seeds.ensure_masks(lambda: call(*samples), always=True)
            graphed = torch.cuda.make_graphed_callables(call, samples, num_warmup_iters=3)
        logger.info("captured %s forward + backward as CUDA graphs", type(call).__name__.strip("_"))
        return graphed

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.encode_text_with_grad and torch.is_grad_enabled()):
            return self._call("text", input_ids)

    @torch.no_grad()
    def encode_clip(self, images: torch.Tensor, posterior_noise: torch.Tensor,
                    image_keys: list | None = None) -> torch.Tensor:
        """Posterior sample mean + std · ``posterior_noise``, x 0.18215 (VideoCrafter2's x0 scale).

        Training clips are still clips (one image repeated, see ``dataset._still_clip``): ``images`` holds each
        clip's one image (n, 3, H, W), encoded once per clip, and every frame gets its own posterior noise — the same
        latents as encoding each frame, for 1/T of the VAE work. With ``config.cache_image_moments``, the posterior
        of an image with a key (``Example.image_key``: class images, materialised examples) is kept on the device
        and reused whenever that image comes again: the VAE then encodes only images augmented on the fly (in one
        batch). A keyed image is encoded alone, so its moments do not depend on what it was first batched with (a
        resumed run, which starts with an empty cache, gets the same latents).
        """
        from customcrafter.models.vae import still_clip_latents, still_image_moments

        vae = self.pipe.vae
        if not self.config.cache_image_moments or image_keys is None or all(k is None for k in image_keys):
            mean, std = still_image_moments(vae, images)
        else:
            moments = [None] * len(image_keys)
            fresh = [row for row, key in enumerate(image_keys) if key is None]  # augmented on the fly: one batch
            if fresh:
                mean, std = still_image_moments(vae, images[fresh])
                for j, row in enumerate(fresh):
                    moments[row] = (mean[j:j + 1], std[j:j + 1])
            for row, key in enumerate(image_keys):
                if key is None:
                    continue
                cached = self._image_moments.get(key)
                if cached is None:  # first sight: encoded alone
                    cached = still_image_moments(vae, images[row:row + 1])
                    if len(self._image_moments) < MAX_CACHED_IMAGE_MOMENTS:
                        self._image_moments[key] = cached
                moments[row] = cached
            mean, std = (torch.cat(parts) for parts in zip(*moments, strict=True))
        return still_clip_latents(vae, mean, std, posterior_noise).to(torch.float32)

    def forward(self, batch: _Batch) -> torch.Tensor:
        # named ranges for benchmarks/profile_train.py (a few µs per step without a profiler)
        with record_function("customcrafter.vae_encode"):
            latents = self.encode_clip(batch.images, batch.posterior_noise, batch.image_keys)  # (B, 4, T, h, w)
        noise, timesteps = batch.noise.to(latents.device), batch.timesteps.to(latents.device)
        noisy = self.pipe.scheduler.add_noise(latents, noise, timesteps)
        with record_function("customcrafter.text_encoder"):
            text = self.encode_text(batch.input_ids)
        fps = torch.full((latents.shape[0],), self.config.fps, device=latents.device, dtype=torch.long)
        self.dropout_seeds.set(batch.seeds)
        with record_function("customcrafter.unet_forward"):
            pred = self._call("unet", noisy.to(self.unet.dtype), timesteps, text.to(self.unet.dtype), fps)
        masks = batch.mask.to(pred.device).split(batch.sizes)
        losses = [epsilon_loss(p, n, m, self.config.loss)
                  for p, n, m in zip(pred.split(batch.sizes), noise.split(batch.sizes), masks, strict=True)]
        loss = losses[0]
        if len(losses) > 1:
            loss = loss + self.config.prior_weight * losses[1]
        return loss


@dataclass
class _Batch:
    """A process's slice: its b instance clips, then (prior preservation) their b class clips, each with its own
    randomness."""

    images: torch.Tensor  # (n, 3, H, W): each still clip's one image (its T frames are copies of it)
    image_keys: list  # Example.image_key of each clip (None: augmented on the fly)
    mask: torch.Tensor  # (n, 1, T, h, w)
    input_ids: torch.Tensor  # (n, 77): the captions, tokenized on the host
    timesteps: torch.Tensor  # (n,) long
    posterior_noise: torch.Tensor  # (n, C, T, h, w): the VAE posterior sample's standard-normal noise
    noise: torch.Tensor  # (n, C, T, h, w): ε
    seeds: list[int]  # example_seed of each clip (dropout masks)
    sizes: list[int]  # clips per branch: [b] or [b, b]


def _latent_shape(pipe, pixels_shape: torch.Size) -> tuple[int, int, int, int]:
    """(C, T, h, w) of a clip's latents."""
    _, frames, height, width = pixels_shape
    factor = pipe.vae_scale_factor
    return (pipe.vae.config.latent_channels, frames, height // factor, width // factor)


def _collate(examples: list[dict], first_index: int, step: int, config: TrainConfig, pipe,
             device: torch.device) -> _Batch:
    """Stack a process's slice (global indices ``first_index`` ...) and draw each clip's noise on the CPU."""
    from customcrafter.models.text import tokenize
    from customcrafter.utils import to_device_async

    num_timesteps = pipe.scheduler.config.num_train_timesteps
    branches = [b for b in _BRANCHES if b in examples[0]]
    items = [element[branch] for branch in branches for element in examples]
    seeds = [example_seed(config.seed, step, first_index + j, branch)
             for branch in branches for j in range(len(examples))]
    shape = _latent_shape(pipe, items[0].pixels.shape)
    draws = [draw_example_noise(seed, shape, num_timesteps) for seed in seeds]
    timesteps, posterior, noise = (torch.stack(column) for column in zip(*draws, strict=True))
    captions = [e.caption for e in items]
    # a still clip's frames are copies of one image: only that image goes to the device
    return _Batch(images=to_device_async(torch.stack([e.pixels[:, 0] for e in items]), device),
                  image_keys=[e.image_key for e in items],
                  mask=to_device_async(torch.stack([e.mask for e in items]), device),
                  input_ids=to_device_async(tokenize(pipe.tokenizer, captions), device),
                  timesteps=to_device_async(timesteps, device),
                  posterior_noise=to_device_async(posterior, device),
                  noise=to_device_async(noise, device),
                  seeds=seeds, sizes=[len(examples)] * len(branches))


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


def store_frozen_in_bf16(pipe, method: SubjectMethod) -> int:
    """Cast every frozen floating-point weight of the UNet, text encoder and VAE to bf16, in place.

    Trained tensors (every stage's, and the token rows) and the token-embedding table stay fp32, so updates and the
    saved token row keep full precision. Returns the number of tensors cast.
    """
    keep = {id(p) for p in method.all_unet_parameters().values()}
    keep |= {id(p) for p in pipe.text_encoder.get_input_embeddings().parameters()}
    cast = 0
    for component in (pipe.unet, pipe.text_encoder, pipe.vae):
        for param in component.parameters():
            if id(param) not in keep and not param.requires_grad and param.is_floating_point():
                param.data = param.data.to(torch.bfloat16)
                cast += 1
    logger.info("frozen weights stored in bf16: %d tensors", cast)
    return cast


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    cpu = config.device == "cpu" or (config.device is None and not torch.cuda.is_available())
    # accelerate keeps one state per process and refuses a second precision; a single process may train again with
    # another one (the distributed set-up, PartialState, is kept)
    if AcceleratorState._shared_state.get("_mixed_precision") not in (None, config.mixed_precision) and \
            PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)


def _stage_ranges(stages: list[Stage]) -> list[tuple[Stage, int, int]]:
    """(stage, first global step, end global step) for each stage."""
    ranges, start = [], 0
    for stage in stages:
        ranges.append((stage, start, start + stage.steps))
        start += stage.steps
    return ranges


class _Log:
    """Per-step losses (device tensors until flushed) and the wall time per step of each flushed interval."""

    def __init__(self, accelerator, losses: list[float]):
        self.accelerator, self.losses = accelerator, losses
        self.pending: list[torch.Tensor] = []
        self.step_seconds: list[float] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.since = time.perf_counter()

    def flush(self) -> None:
        if not self.pending:
            return
        # The one host sync, every log_every steps: the mean over processes = the mean over the global batch.
        stacked = self.accelerator.reduce(torch.stack(self.pending).float(), reduction="mean")
        first = len(self.losses) + 1  # the global step of the first pending loss
        self.losses.extend(stacked.cpu().tolist())
        # checked here, before a checkpoint or the module is written (a flush precedes both) and on every process
        bad = next(((first + i, v) for i, v in enumerate(self.losses[first - 1:]) if not math.isfinite(v)), None)
        if bad is not None:
            raise FloatingPointError(f"training loss is {bad[1]} at step {bad[0]}; the weights are no longer "
                                     "usable. Lower the learning rate, set max_grad_norm, or use fp32")
        now = time.perf_counter()
        self.step_seconds.append((now - self.since) / len(self.pending))
        self.since = now
        self.pending.clear()


# --- resuming ------------------------------------------------------------------------------------------------------
#: TrainConfig fields that do not change what a run computes, so a checkpoint resumes across them: where it writes
#: and how often it logs or checkpoints; the run's length (a step does not depend on how many follow); and what their
#: descriptions give as speed only (same losses up to rounding). The subject, base model, batch split, class images
#: and materialised examples are fingerprinted resolved instead (:func:`run_fingerprint`: the files by content).
_NOT_FINGERPRINTED = frozenset({
    "output_dir", "overwrite", "resume", "log_every", "checkpoint_every", "keep_checkpoints", "checkpoints_dir",
    "steps", "dreamvideo.adapter_steps",
    "device", "gradient_checkpointing", "compile", "compile_rewrites", "temporal_attention", "cuda_graphs",
    "cudnn_benchmark", "cache_image_moments", "class_images_cache_dir",
    "subject_dir", "class_word", "token", "kind", "base_model", "per_device_batch_size",
    "class_images_dir", "examples_dir",
})


def _flatten(values: dict, prefix: str = "") -> dict:
    """Nested config values as ``{"a.b": value}``, the values kept as they are (tracking.flatten_params makes them
    strings for MLflow; a fingerprint keeps them typed, so a mismatch shows 0.002, not '0.002')."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_fingerprint(config: TrainConfig, subject, pipe, global_batch: int,
                    drawn_files: dict[str, list[Path]] | None = None) -> dict:
    """What a checkpoint must share with a run to be resumed by it (JSON): the resolved subject (its images by
    content, not where the folder is; name, class word, token, kind), the base model (as named and its signature), the global batch and every other
    TrainConfig field but :data:`_NOT_FINGERPRINTED`; ``drawn_files`` (``SubjectDataset.drawn_files``: class images,
    materialised examples) by content too, so a folder whose images changed is not resumed."""
    from customcrafter.data.subjects import files_digest
    from customcrafter.loading import base_model_signature

    base = Path(config.base_model)
    fields = {k: v for k, v in _flatten(config.model_dump(mode="json")).items() if k not in _NOT_FINGERPRINTED}
    return json.loads(json.dumps({
        "subject.images": files_digest(subject.image_paths)[:16],
        "subject.name": subject.name, "subject.class_word": subject.class_word, "subject.token": subject.token,
        "subject.kind": subject.kind,
        "base_model": str(base.resolve()) if base.exists() else config.base_model,
        "base_model.signature": base_model_signature(pipe),
        "global_batch": global_batch,
        **{kind: files_digest(paths)[:16] for kind, paths in (drawn_files or {}).items()},
        **fields,
    }))


def _fingerprint_mismatch(path: Path, saved: dict | None, fingerprint: dict) -> str | None:
    """Why the checkpoint at ``path`` is not this run's (None when it is)."""
    advice = ("pass another output_dir, or resume=false to train from scratch here (the folder's checkpoints "
              "are then removed)")
    if saved is None:
        return (f"{path}: checkpoint without a run fingerprint (written before fingerprints were recorded), so it "
                f"cannot be told apart from another run's; {advice}")
    differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if not differ:
        return None
    shown = ", ".join(f"{k} (checkpoint {saved.get(k)!r}, this run {fingerprint.get(k)!r})" for k in differ[:6])
    more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
    return f"{path}: checkpoint of another run: {shown}{more}; {advice}"


def _clear_checkpoints(checkpoints_dir: Path, why: str) -> None:
    """Remove the run's checkpoints from ``checkpoints_dir`` (only them: :func:`remove_checkpoints`)."""
    if remove_checkpoints(checkpoints_dir):
        logger.info("removed the checkpoints in %s (%s)", checkpoints_dir, why)


def _resume(config: TrainConfig, method: SubjectMethod, dataset: SubjectDataset, total: int, fingerprint: dict):
    path = latest_checkpoint(config.resolved_checkpoints_dir()) if config.resume else None
    if path is None:
        return 0, [], None
    checkpoint = load_checkpoint(path)
    mismatch = _fingerprint_mismatch(path, checkpoint.extra.get("fingerprint"), fingerprint)
    if mismatch:
        raise ValueError(mismatch)
    if checkpoint.step > total:
        raise ValueError(f"{path}: checkpoint at step {checkpoint.step} but this run has only {total} steps")
    method.load_trainable_state(checkpoint.trainable)
    restore_rng(checkpoint.rng["tensors"], checkpoint.rng["info"], dataset.rng)
    logger.info("resumed from %s (step %d of %d)", path, checkpoint.step, total)
    return checkpoint.step, checkpoint.losses, checkpoint


def _optimizer(params: list[nn.Parameter], stage: Stage, config: TrainConfig) -> torch.optim.Optimizer:
    # fused: one kernel per step on CUDA instead of a few per tensor group (no host sync either way)
    fused = all(p.device.type == "cuda" for p in params) or None
    return torch.optim.AdamW(params, lr=stage.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                             weight_decay=stage.weight_decay, fused=fused)


def check_token_before_loading(config: TrainConfig, pipe=None):
    """The resolved subject, once its placeholder token is known to be new to the base model's tokenizer (read
    without its weights: :func:`~customcrafter.loading.load_base_tokenizer`): a token the tokenizer already holds
    (a folder saved with a module's token, a pipeline that has one) is refused in seconds, not after the base model
    has loaded. (Malformed tokens such as 'Dog', which CLIP reads as 'dog', are refused by resolve_subject.)"""
    from customcrafter.loading import load_base_tokenizer
    from customcrafter.training.tokens import check_new_token

    subject = resolve_subject(config.subject_dir, config.class_word, config.token, config.kind)
    tokenizer = pipe.tokenizer if pipe is not None else load_base_tokenizer(config.base_model)
    check_new_token(tokenizer, subject.token)
    return subject


# --- the loop -----------------------------------------------------------------------------------------------------
def train(config: TrainConfig, *, pipe=None) -> TrainResult:
    """Train a subject module; returns where it was written, the per-step losses and the step count.

    ``pipe``: an already loaded base pipeline of ``config.base_model`` to train in place (tests, notebooks);
    by default it is loaded here.
    """
    from accelerate.utils import set_seed

    from customcrafter.loading import load_base_pipeline
    from customcrafter.subject_module import LOSSES_FILE, MODULE_FILE, MODULE_SUBDIR, save_subject_module
    from customcrafter.training.class_images import resolve_class_images
    from customcrafter.training.tokens import add_placeholder_token, unsplice

    started = time.perf_counter()
    module_dir = Path(config.output_dir) / MODULE_SUBDIR
    blocker = file_in_the_way(config.output_dir)
    if blocker is not None:  # before minutes of loading and training, not when the module is written
        raise FileExistsError(f"output_dir {config.output_dir}: {blocker} is a file, not a folder; pass a folder")
    if (module_dir / MODULE_FILE).is_file() and not config.overwrite:  # before minutes of loading and training
        raise FileExistsError(f"{module_dir}: a finished subject module is there (overwrite=false); pass another "
                              "output folder, or --force / overwrite=true to replace it")
    subject = check_token_before_loading(config, pipe)
    accelerator = _make_accelerator(config)
    set_seed(config.seed)
    if pipe is None:
        pipe = load_base_pipeline(config.base_model, device=accelerator.device)
    # every process draws its share of the class images (none waits in a collective while one generates them all)
    class_images = resolve_class_images(config, pipe, subject.class_word, accelerator) \
        if config.prior_preservation else []
    set_seed(config.seed)  # class-image generation must not change what training draws

    method = make_method(config)
    token_id = add_placeholder_token(pipe.tokenizer, pipe.text_encoder, subject.token, subject.class_word,
                                     config.token_init)
    method.setup(pipe, [token_id])
    if config.frozen_dtype == "bf16":
        if accelerator.device.type == "cuda":
            store_frozen_in_bf16(pipe, method)
        else:  # CPU autocast keeps some norms in fp32 and rejects bf16 weights there
            logger.warning("frozen_dtype 'bf16' applies on CUDA only; keeping fp32 weights on %s",
                           accelerator.device.type)
    hooks = detach_start_token_kv(pipe.unet) if config.detach_sot_kv else []
    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        checkpointing = accelerator.device.type == "cuda"
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    if config.temporal_attention != "sdpa":
        from customcrafter.performance import set_temporal_attention

        set_temporal_attention(pipe.unet, config.temporal_attention)
    if config.compile != "none" and accelerator.device.type == "cuda":
        from customcrafter.performance import compile_unet, prepare_unet_for_compiled_training

        if config.compile_rewrites:
            prepare_unet_for_compiled_training(pipe.unet)
        compile_unet(pipe.unet, config.compile)
        logger.info("torch.compile (%s): the first step compiles the UNet's forward and backward (minutes at full "
                    "size: ~6 minutes on an H100; a later process reuses TORCHINDUCTOR_CACHE_DIR)", config.compile)
    elif config.compile != "none":
        logger.warning("compile applies on CUDA only; training the UNet eagerly on %s", accelerator.device.type)
    dataset = SubjectDataset(subject, config, class_images)

    per_device, processes = config.per_device_batch_size, accelerator.num_processes
    global_batch, first_index = per_device * processes, per_device * accelerator.process_index
    stages = method.stages(global_batch)
    total = sum(s.steps for s in stages)
    schedule = run_schedule(stages, processes, global_batch)
    fingerprint = run_fingerprint(config, subject, pipe, global_batch, dataset.drawn_files())
    start_step, losses, checkpoint = _resume(config, method, dataset, total, fingerprint)
    checkpoints_dir = config.resolved_checkpoints_dir()
    if not config.resume and accelerator.is_main_process:
        _clear_checkpoints(checkpoints_dir, "resume=false: an earlier run's checkpoints")
    accelerator.wait_for_everyone()
    logger.info("training %s for %d steps: global batch %d = %d per process x %d process(es)%s", config.method,
                total, global_batch, per_device, processes,
                " (+ as many class clips)" if config.prior_preservation else "")
    progress = tqdm(total=total, initial=start_step, desc=f"train {config.method}", unit="step",
                    disable=not accelerator.is_local_main_process)
    log = _Log(accelerator, losses)
    dropout_seeds, dropouts = install_example_dropout(pipe.unet)
    model = DiffusionLoss(pipe, config, dropout_seeds=dropout_seeds, num_processes=processes)
    cudnn_benchmark = torch.backends.cudnn.benchmark  # process-wide: put back when training ends
    # training puts the models in training mode: each goes back to the mode it came in (from_pretrained: eval)
    modes = [(part, part.training) for part in (pipe.unet, pipe.text_encoder, pipe.vae)]
    if config.cudnn_benchmark and accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        for stage, first, end in _stage_ranges(stages):
            if end <= start_step:
                continue
            params = method.begin_stage(stage)
            model.encode_text_with_grad = stage.train_token
            model.reset_graphs()
            optimizer = _optimizer(params, stage, config)
            if checkpoint is not None and checkpoint.extra.get("stage") == stage.name and start_step > first:
                optimizer.load_state_dict(checkpoint.optimizer)
            trained, optimizer = accelerator.prepare(model, optimizer)
            trained.train()
            log.restart_clock()
            for step in range(max(first, start_step), end):
                elements = dataset.next_global_batch(global_batch)[first_index:first_index + per_device]
                batch = _collate(elements, first_index, step, config, pipe, accelerator.device)
                with accelerator.autocast():
                    loss = trained(batch)
                with record_function("customcrafter.backward"):
                    accelerator.backward(loss)
                with record_function("customcrafter.optimizer"):
                    if config.max_grad_norm:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                log.pending.append(loss.detach())
                progress.update(1)
                done = step + 1
                if done % config.log_every == 0 or done == end:
                    log.flush()
                    progress.set_postfix(stage=stage.name, loss=f"{losses[-1]:.4f}")
                if config.checkpoint_every and done % config.checkpoint_every == 0 and done < total:
                    log.flush()
                    if accelerator.is_main_process:
                        save_checkpoint(checkpoints_dir, done, method.trainable_state(), optimizer.state_dict(),
                                        dataset.rng, losses, {"method": config.method, "stage": stage.name,
                                                              "fingerprint": fingerprint},
                                        keep=config.keep_checkpoints)
                    accelerator.wait_for_everyone()
                    log.restart_clock()  # step_seconds times training, not checkpoint writing
            model = accelerator.unwrap_model(trained)
            accelerator.free_memory()
        log.flush()
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        for part, training in modes:
            part.train(training)
        progress.close()
        for handle in hooks:
            handle.remove()
        restore_dropout(dropouts)

    if accelerator.is_main_process:
        if checkpointing:
            pipe.unet.disable_gradient_checkpointing()
        unsplice(pipe.text_encoder)
        # the losses are written inside the module's one atomic folder write, so they are always that module's; a
        # losses.json beside it (written there before) would now describe an older module: gone first
        (Path(config.output_dir) / LOSSES_FILE).unlink(missing_ok=True)
        save_subject_module(module_dir, method=method, pipe=pipe, subject=subject, config=config,
                            token_id=token_id, schedule=schedule, losses=losses)
        _clear_checkpoints(checkpoints_dir, "the run finished and its module is written")
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    logger.info("trained %s for %d steps in %.1fs (final loss %.4f)", config.method, total, seconds,
                losses[-1] if losses else float("nan"))
    return TrainResult(module_dir=module_dir, losses=losses, steps=total, seconds=seconds,
                       step_seconds=log.step_seconds, schedule=schedule)
