"""TrainConfig: every knob of subject learning, with defaults that reproduce the CustomCrafter paper.

Where the reference code differs from the paper, the code's choice is a named option (see ``docs/METHOD.md``):
``lr_preset="reference"`` (2.4e-4), ``loss="l1"`` (masked), ``caption_dropout=0.2``. The baselines (Custom
Diffusion, DreamVideo) are selected with ``method``; fields left at None take the method's own recipe
(``METHOD_RECIPES``: prior preservation, token initialisation, loss; ``resolved_steps``/``resolved_lr``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from customcrafter.config import StrictModel
from customcrafter.data.augment import AugmentConfig
from customcrafter.training.method_names import METHODS, Method  # the one list of method names (re-exported)

__all__ = ["TrainConfig", "DreamVideoConfig", "Method", "METHODS", "METHOD_RECIPES", "REFERENCE_LR",
           "CUSTOM_DIFFUSION_BASE_LR", "PAPER_INSTANCE_TEMPLATES"]

#: The reference code's effective learning rate: 3e-5 auto-scaled x2 (prior preservation) x4 GPUs x batch 1.
REFERENCE_LR = 2.4e-4
#: Custom Diffusion's learning rate per training image: its code scales 1e-5 by the images in a step (8e-5 at its
#: batch of 8, which the pipeline's 4 processes x (instance + class clip) match).
CUSTOM_DIFFUSION_BASE_LR = 1e-5
#: What each method does where its paper and code differ from CustomCrafter's (fields left at None):
#: - prior preservation: CustomCrafter and Custom Diffusion train with class images, DreamVideo (VGen) without;
#: - token initialisation: CustomCrafter's code the class word's BPE piece ('dog'), Custom Diffusion's code the rare
#:   token 'ktn' (id 42170), DreamVideo's code the class word as a prompt token ('dog</w>');
#: - loss: the paper's L2, Custom Diffusion's L2 averaged over the zoom mask (its masked loss on instance images).
METHOD_RECIPES: dict[str, dict[str, object]] = {
    "customcrafter": {"prior_preservation": True, "token_init": "piece", "loss": "l2"},
    "custom_diffusion": {"prior_preservation": True, "token_init": "rare", "loss": "l2_masked"},
    "dreamvideo": {"prior_preservation": False, "token_init": "word", "loss": "l2"},
}
#: The reference code's instance caption templates; "{}" is filled with "<prefix><token> <class word>".
PAPER_INSTANCE_TEMPLATES = ("video of a {}", "{}", "a static video of a {}", "a {}")


class DreamVideoConfig(StrictModel):
    """DreamVideo subject learning (Wei et al., CVPR 2024): textual inversion, then an identity adapter."""

    inversion_steps: int = Field(3000, ge=0, description="stage 1: steps learning the token embedding alone")
    inversion_lr: float = Field(1e-4, gt=0, description="stage 1 learning rate")
    adapter_steps: int | None = Field(None, ge=1, description="stage 2 steps; None = 800 (dreamvideo) or 3000 "
                                                                "(dreamvideo_long). `steps` overrides it too")
    adapter_lr: float = Field(1e-5, gt=0, description="stage 2 learning rate (token frozen)")
    adapter_hidden_ratio: float = Field(0.5, gt=0, description="adapter hidden width / block width (DreamVideo: 1/2)")
    weight_decay: float = Field(0.0, ge=0, description="VGen's AdamW uses no weight decay")


class TrainConfig(StrictModel):
    """Subject learning for one subject with one method. Defaults = the CustomCrafter paper."""

    # --- what -------------------------------------------------------------------------------------------------
    method: Method = Field("customcrafter", description="customcrafter (SSLM LoRA + token) or a baseline")
    base_model: str = Field("VideoCrafter/VideoCrafter2", description="'tiny', a hub id, a checkpoint or a folder")
    subject_dir: str = Field(..., description="subject folder (images + subject.yaml, or images + class_word)")
    examples_dir: str | None = Field(None, description="optional pre-augmented examples (materialise_examples "
                                                         "output): instance examples are drawn from them instead "
                                                         "of augmenting on the fly")
    class_word: str | None = Field(None, description="class word; default from subject.yaml")
    token: str | None = Field(None, description="placeholder token; default from subject.yaml, else '<new1>'")
    kind: Literal["live", "object"] | None = Field(None, description="live/object; default from subject.yaml")
    output_dir: str = Field("outputs/subject_module", description="the subject module is written here; "
                                                                  "checkpoints under output_dir/checkpoints")
    overwrite: bool = Field(True, description="replace a finished module in output_dir; false: refuse to train "
                                              "(before loading anything). The CLI sets false unless --force")

    # --- SSLM LoRA --------------------------------------------------------------------------------------------
    lora_rank: int = Field(4, ge=1, description="LoRA rank (paper: 4); alpha = rank, i.e. no extra scaling")
    lora_targets: Literal["qkv", "qkv_out"] = Field("qkv", description="'qkv' = to_q/k/v of attn1 and attn2 "
                                                                       "(paper); 'qkv_out' adds to_out.0")
    lora_temporal: bool = Field(False, description="also wrap the temporal transformers' attention (an older "
                                                    "reference commit did: 192 layers)")
    token_init: Literal["piece", "word", "rare"] | None = Field(
        None, description="initial embedding of the token: 'piece' = the class word's non-word-final BPE piece "
                          "('cat', as the reference code); 'word' = mean of the tokens of the class word as it "
                          "appears in prompts ('cat</w>', DreamVideo's code); 'rare' = the rare token 'ktn' (Custom "
                          "Diffusion's code). 'piece' falls back to 'word' when the piece is not in the vocab. None = "
                          "the method's (METHOD_RECIPES)")
    detach_sot_kv: bool = Field(True, description="Custom Diffusion's trick (also in the CustomCrafter reference "
                                                  "code): the key/value of the first context token (start of "
                                                  "text) get no gradient in cross-attention")

    # --- optimisation -----------------------------------------------------------------------------------------
    steps: int | None = Field(None, ge=1, description="training steps; None = the method's default (customcrafter "
                                                        "10000, custom_diffusion 250 as its paper, _long 10000, "
                                                        "dreamvideo: adapter steps)")
    lr: float | None = Field(None, gt=0, description="learning rate; None = the method's default (customcrafter 3e-5 "
                                                     "or lr_preset; custom_diffusion 1e-5 per image in a step, "
                                                     "instance and class clips of all processes, as its code "
                                                     "scales it: 8e-5 on 4 processes; dreamvideo: adapter_lr)")
    lr_preset: Literal["paper", "reference"] = Field("paper", description="customcrafter lr when lr is None: "
                                                                          "paper 3e-5, reference code 2.4e-4")
    per_device_batch_size: int = Field(
        1, ge=1, description="instance clips (and, with prior preservation, as many class clips) per process per "
                             "step; global batch = per_device_batch_size x number of processes (the reference code: "
                             "1 on each of 4 GPUs). CustomCrafter's learning rate is not scaled with it (Custom "
                             "Diffusion's is, see lr). A run's data, noise and "
                             "timesteps depend on the global batch only, not on how it is split over processes")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay (only on the trained tensors)")
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = Field(None, gt=0, description="gradient clipping; None = off (reference)")
    loss: Literal["l2", "l1", "l2_masked"] | None = Field(
        None, description="l2 = mean squared error on epsilon (paper); l1 = sum|e - e_hat| * mask / sum(mask) "
                          "(reference code); l2_masked = sum (e - e_hat)^2 * mask / sum(mask) (Custom Diffusion: "
                          "only the pasted subject of a zoomed-out image counts). None = the method's "
                          "(METHOD_RECIPES)")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="probability that a caption becomes '' "
                                                                  "(reference code: 0.2)")
    prior_preservation: bool | None = Field(None, description="class prior preservation loss; None = the method's "
                                                              "(on for customcrafter and custom_diffusion, off for "
                                                              "dreamvideo as VGen trains it)")
    prior_weight: float = Field(1.0, ge=0, description="alpha in loss = instance + alpha * prior")
    num_class_images: int = Field(200, ge=1)
    class_prompt: str = Field("a photo of a {class_word}", description="caption of the class images")
    class_images_dir: str | None = Field(None, description="user-provided class images; else generated once with "
                                                           "the base model and cached")
    class_images_cache_dir: str | None = Field(None, description="cache root for generated class images; "
                                                                 "None = class_images/ in the cache (loading.default_cache_dir)")
    class_image_steps: int = Field(50, ge=1, description="DDIM steps used to generate class images")

    # --- data -------------------------------------------------------------------------------------------------
    num_frames: int = Field(4, ge=1, description="frames of each still training clip (reference 4; option 16)")
    resolution: tuple[int, int] = Field((320, 512), description="(H, W)")
    fps: int = Field(16, ge=1, description="fps conditioning in training; recorded in the module and used for "
                                           "sampling (reference code: 16 for both; VideoCrafter2 default 28)")
    instance_templates: tuple[str, ...] = Field(PAPER_INSTANCE_TEMPLATES, min_length=1)
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="instance augmentation; its "
                                                                              "resolution follows `resolution`")

    # --- run --------------------------------------------------------------------------------------------------
    seed: int = 23
    mixed_precision: Literal["no", "bf16"] = Field("no", description="bf16 autocast (GPU); the paper trains fp32")
    gradient_checkpointing: bool | None = Field(None, description="None = on when a GPU is used")
    frozen_dtype: Literal["fp32", "bf16"] = Field("fp32", description="storage of the frozen weights (UNet, text "
                                                                   "encoder, VAE); 'bf16' (needs mixed_precision "
                                                                   "bf16) skips autocast's per-op weight casts. The "
                                                                   "trained tensors and the token table stay fp32")
    compile: Literal["none", "regional", "full"] = Field(
        "none", description="torch.compile the UNet: 'regional' (its repeated blocks) or 'full' (the whole forward); "
                            "GPU only, replayed in CUDA graphs (see cuda_graphs). The first step compiles for "
                            "minutes at full size (H100: ~6 min 'full' from an empty cache; inductor's cache in "
                            "TORCHINDUCTOR_CACHE_DIR serves later processes: ~2.3 min at 16 frames). Measured on "
                            "one H100 with bf16 autocast and the Triton temporal attention: 4 frames with gradient checkpointing, "
                            "'full' 0.130 s per step (10.7 GiB) against 0.205 s with CUDA graphs alone; 16 frames "
                            "without checkpointing, 'full' 0.232 s (37 GiB) against 0.40 s (52 GiB); 'regional' "
                            "0.275 s (session 15, SDPA temporal attention). Opt-in: the "
                            "compile is repaid after ~2,000-5,000 steps, and it is untimed in fp32 and on "
                            "several GPUs; benchmarks/RESULTS.md")
    compile_rewrites: bool = Field(
        True, description="with compile: also run the UNet as compiled sampling does - channels-last convolutions "
                          "and the exact layer rewrites of customcrafter.fusions (sub-pixel upsampling, "
                          "channel-statistics GroupNorm, unfused linear bias). The measured compiled training "
                          "(benchmarks/RESULTS.md) ran with them; false = compile the UNet as it is")
    temporal_attention: Literal["sdpa", "efficient", "triton"] = Field(
        "triton", description="the UNet's temporal attention on CUDA: 'triton' = the short-sequence kernel sampling "
                              "uses (customcrafter.kernels.temporal_attention) with its backward kernel, whole "
                              "sequences per tile (H100, same machine, CUDA graphs: 4 frames with checkpointing "
                              "0.205 against 0.222 s per step, 16 frames 0.396 against 0.401 s); 'efficient' pins "
                              "SDPA to its memory-efficient kernel; 'sdpa' = SDPA's own choice. Where the kernel "
                              "does not apply (CPU, float32, sequences over 64, a card older than Ampere) it falls "
                              "back to 'efficient'. benchmarks/RESULTS.md")
    cuda_graphs: bool | None = Field(None, description="capture the UNet's and the text encoder's forward and "
                                                        "backward as CUDA graphs once per stage and replay them every "
                                                        "step (removes the per-kernel launch overhead that makes eager "
                                                        "training host-bound: 2.5x faster on an H100). None = on when "
                                                        "training on CUDA in one process, compiled or not (multi-GPU "
                                                        "with graphs is untested; True forces it). Same losses and weights as eager "
                                                        "up to kernel non-determinism; see benchmarks/RESULTS.md")
    cudnn_benchmark: bool = Field(
        False, description="let cuDNN time its convolution algorithms for the training shapes, which do not change "
                           "between steps (sampling always does, performance.optimize_pipeline); CUDA only, reset "
                           "when training ends. Off: on an H100 it changed nothing (0.401 against 0.399 s per step "
                           "at 16 frames, 0.223 against 0.220 s at 4; benchmarks/RESULTS.md)")
    cache_image_moments: bool = Field(
        True, description="keep the VAE posterior of every image that always comes back the same (class images, "
                          "materialised examples) on the device and reuse it, so the VAE encodes only images "
                          "augmented on the fly. Same latents up to convolution rounding; a cached image is "
                          "encoded alone on first sight, so a resumed run gets the same ones")
    device: str | None = Field(None, description="None = CUDA if available (accelerate picks under launch)")
    checkpoint_every: int | None = Field(500, ge=1, description="save a resumable checkpoint every N steps")
    checkpoints_dir: str | None = Field(None, description="where checkpoints go; None = output_dir/checkpoints (the "
                                                          "pipeline puts them on the model-cache volume, so a "
                                                          "retried pod resumes)")
    keep_checkpoints: int = Field(2, ge=1, description="how many checkpoints to keep")
    resume: bool = Field(True, description="resume from the last checkpoint in checkpoints_dir")
    log_every: int = Field(10, ge=1, description="host sync for loss logging every N steps")

    dreamvideo: DreamVideoConfig = Field(default_factory=DreamVideoConfig)

    def resolved_checkpoints_dir(self) -> Path:
        return Path(self.checkpoints_dir) if self.checkpoints_dir else Path(self.output_dir) / "checkpoints"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.frozen_dtype == "bf16" and self.mixed_precision != "bf16":
            raise ValueError("frozen_dtype 'bf16' needs mixed_precision 'bf16' (fp32 activations cannot meet bf16 "
                             "weights)")
        height, width = self.resolution
        if height <= 0 or width <= 0 or height % 8 or width % 8:
            raise ValueError(f"resolution {self.resolution}: both sides must be positive multiples of 8")
        for name, value in METHOD_RECIPES[self.method.removesuffix("_long")].items():
            if getattr(self, name) is None:  # resolved once, so logs, checkpoints and the module record the value
                self.__dict__[name] = value
        if tuple(self.augment.resolution) != tuple(self.resolution):
            # One source of truth for the frame size: the augmentation follows `resolution`.
            self.__dict__["augment"] = self.augment.model_copy(update={"resolution": tuple(self.resolution)})
        for template in self.instance_templates:
            if "{}" not in template:
                raise ValueError(f"instance_templates: {template!r} has no '{{}}' placeholder")
        return self

    # --- method defaults --------------------------------------------------------------------------------------
    def resolved_lr(self, global_batch: int = 1) -> float:
        """The learning rate of the main stage, for ``global_batch`` instance clips per step (all processes)."""
        if self.lr is not None:
            return self.lr
        if self.method == "customcrafter":
            return REFERENCE_LR if self.lr_preset == "reference" else 3e-5
        if self.method.startswith("custom_diffusion"):
            return CUSTOM_DIFFUSION_BASE_LR * global_batch * (2 if self.prior_preservation else 1)
        return self.dreamvideo.adapter_lr

    def resolved_steps(self) -> int:
        """The step count of the main (last) stage."""
        if self.steps is not None:
            return self.steps
        return {"customcrafter": 10000, "custom_diffusion": 250, "custom_diffusion_long": 10000,
                "dreamvideo": self.dreamvideo.adapter_steps or 800,
                "dreamvideo_long": self.dreamvideo.adapter_steps or 3000}[self.method]
