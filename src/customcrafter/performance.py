"""GPU speed settings for sampling and training: one place, each a named, measured option.

``optimize_pipeline(pipe, SpeedConfig())`` turns a loaded pipeline into the fast one: bf16 weights (the scheduler's
arithmetic and the latents between steps stay float32: see ``VideoCrafter2Pipeline``), PyTorch SDPA attention
(flash attention on Hopper), our Triton temporal-attention kernel (``customcrafter.kernels``), layer rewrites
that compute the same function (``customcrafter.fusions``; spatial cross-attention with its keys and values once per
video, ``use_video_context_attention``), ``torch.compile`` of the UNet (whole or its repeated
blocks) with channels-last convolutions and, for the whole UNet, CUDA graphs, and batched VAE decoding. What each
one buys on an H100 is in ``benchmarks/RESULTS.md`` (``python benchmarks/gpu.py``).

Compilation is opt-in (``compile="full"``): it pays for itself after a few dozen videos (the evaluation set), not
for one. On the CPU ``optimize_pipeline`` only sets what is safe (no compile, float32), so the same call can sit in
every code path.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from customcrafter.config import StrictModel

__all__ = ["SpeedConfig", "optimize_pipeline", "set_temporal_attention", "EfficientAttnProcessor",
           "compile_unet", "prepare_unet_for_compiled_training",
           "TritonTemporalAttnProcessor", "VideoContextAttnProcessor", "use_video_context_attention",
           "UNET_REPEATED_BLOCKS", "DTYPES", "dtype_name"]

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """SpeedConfig's name of a torch dtype ('bf16', ...); torch's name for any other ('float64')."""
    return next((name for name, known in DTYPES.items() if known == dtype), str(dtype).removeprefix("torch."))

#: The UNet's repeated building blocks: what regional compilation compiles (each distinct shape once).
UNET_REPEATED_BLOCKS = ("ResnetBlock2D", "TemporalConvLayer", "Transformer2DModel", "TransformerTemporalModel",
                        "Downsample2D", "Upsample2D")


class SpeedConfig(StrictModel):
    """How to run on a GPU. On the CPU only ``dtype`` = fp32 and ``decode_chunk_size`` apply."""

    dtype: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="weights and activations of the UNet, "
                                                                        "text encoder and VAE")
    channels_last: bool | None = Field(None, description="channels-last weights for the UNet's and VAE's convs. None "
                                                          "= on when compiling (H100, full compile: 4.79 -> 4.44 s per "
                                                          "video; cuDNN's NCHW<->NHWC conversions go), off in eager "
                                                          "mode (no gain there)")
    compile: Literal["none", "regional", "full"] = Field(
        "none", description="torch.compile: 'full' compiles the whole UNet forward (H100, with channels-last, the "
                            "rewrites and CUDA graphs: 8.0 s -> 3.5 s per video after ~3-4 min of compilation, so "
                            "for batches of videos), 'regional' its repeated blocks (~2 min, 6.7 s), 'none' runs "
                            "eagerly")
    compile_mode: str | None = Field(
        None, description="torch.compile mode of the compiled parts. None = 'reduce-overhead' (CUDA graphs) with "
                          "compile='full', the default mode otherwise; 'default' compiles without graphs. H100: 3.83 "
                          "-> 3.68 s per video (the host, launching ~2,000 GPU operations per step, had become as slow "
                          "as the GPU); outputs a caller keeps are copied (prompt embeddings, decoded chunks)")
    cudagraph_trees: bool = Field(
        True, description="with CUDA graphs (compile_mode 'reduce-overhead'): torch.compile's CUDA graph trees (True: "
                          "one memory pool shared by all graphs) or inductor's plain capture of each compiled graph "
                          "(False: its own pool, inputs copied into static buffers, one replay per call; dynamo's "
                          "guards still choose the graph). Session 27: captured plainly, the pipeline ran ~0.8 ms "
                          "per step over the UNet's replay; with trees ~2.5 ms over a replay timed elsewhere. Not yet "
                          "compared on one machine (benchmarks/probe_graph_capture.py, gpu.py variant '-no-trees')")
    compile_vae: bool | None = Field(None, description="also torch.compile the VAE decoder (fuses its GroupNorm + "
                                                      "SiLU at full resolution; H100: decode 0.17 -> 0.09 s per "
                                                      "video). None = with compile='full'")
    compile_text: bool | None = Field(None, description="also torch.compile the text encoder (run eagerly it is "
                                                        "host-bound; H100: 0.037 -> 0.027 s per video). None = with "
                                                        "compile='full'")
    channel_stats_group_norm: bool | None = Field(
        None, description="GroupNorm from per-channel statistics (customcrafter.fusions): inductor's own GroupNorm "
                          "reduction is slow on channels-last inputs, worst on the up-blocks' concatenations. None = "
                          "in whatever is compiled (eager mode keeps PyTorch's fused CUDA kernel)")
    subpixel_upsample: bool | None = Field(
        None, description="run each upsampler's nearest 2x + 3x3 conv as 2x2 convs on its input (customcrafter."
                          "fusions: 2.25x fewer FLOPs, exact up to rounding; maps under 512 positions keep the plain "
                          "form). None = on")
    unfused_linear_bias: bool | None = Field(
        None, description="run each biased linear layer as a plain matmul and a separate bias add (customcrafter."
                          "fusions): under torch.compile the add fuses into the next kernel and cuBLAS skips its "
                          "slower bias-epilogue GEMMs. None = in whatever is compiled (eagerly the add would be one "
                          "more pass over the output)")
    context_per_video: bool | None = Field(
        None, description="the spatial cross-attention's keys and values once per video, not once per frame "
                          "(use_video_context_attention): the text context is the same for all frames, so to_k/to_v "
                          "run on B x 77 rows instead of B x T x 77, the context is no longer repeated per frame, and "
                          "each video's frames are one long query sequence of one attention call. Exact (every query "
                          "row's softmax over the same keys; up to rounding); H100 gain not yet measured. None = in "
                          "the compiled UNet")
    fused_geglu: bool = Field(
        True, description="run the UNet feed-forwards' GEGLU (projection + gating) as one Triton GEMM with the gating "
                          "in its epilogue where it measured faster (customcrafter.fusions: K <= 640, levels 0-1; H100 "
                          "level 0 0.47 -> 0.34 ms per layer); CUDA, no gradient, a card with device-side TMA and "
                          "the kernel's 176 KiB of shared memory (Hopper, datacenter Blackwell; not an A100 or a "
                          "consumer card), else the layer's own path")
    decode_chunk_size: int = Field(8, ge=1, description="frames per VAE decode call (the original decodes 1 at a "
                                                        "time; 8 is faster and keeps peak memory low)")
    tf32: bool = Field(True, description="allow TF32 for whatever still runs in float32 matmuls/convs")
    sdpa: bool = Field(True, description="PyTorch scaled_dot_product_attention (flash / memory-efficient kernels)")
    temporal_attention: Literal["sdpa", "efficient", "math", "triton"] = Field(
        "triton", description="the temporal transformers' attention (sequences of 16 frames): 'triton' = our "
                              "short-sequence kernel (customcrafter.kernels; H100: 0.08 ms per L0 layer, near the "
                              "0.07 ms bandwidth floor, against 0.28 ms for 'efficient'), falling back to 'efficient' "
                              "where it does not apply (CPU, no Triton, a card older than Ampere); 'efficient' = SDPA "
                              "pinned to the memory-efficient kernel on CUDA, which beats the cuDNN/flash kernels SDPA "
                              "picks at such short sequences (full compile: 4.32 -> 4.20 s per video); 'sdpa' = "
                              "SDPA's own choice; "
                              "'math' = plain batched matmul + softmax (diffusers' AttnProcessor). All but 'sdpa' need "
                              "sdpa for the spatial layers")

    def resolved_compile_mode(self) -> str | None:
        if self.compile_mode is None:
            return "reduce-overhead" if self.compile == "full" else None
        return self.compile_mode

    def compile_kwargs(self) -> dict:
        """torch.compile's ``mode`` (or ``options``) for the compiled parts."""
        mode = self.resolved_compile_mode()
        if mode == "reduce-overhead" and not self.cudagraph_trees:
            return {"options": {"triton.cudagraphs": True, "triton.cudagraph_trees": False}}
        return {"mode": mode}

    def resolved_compile_vae(self) -> bool:
        return self.compile == "full" if self.compile_vae is None else self.compile_vae

    def resolved_compile_text(self) -> bool:
        return self.compile == "full" if self.compile_text is None else self.compile_text

    def resolved_subpixel_upsample(self) -> bool:
        return True if self.subpixel_upsample is None else self.subpixel_upsample

    def resolved_channel_stats_group_norm(self, compiled: bool) -> bool:
        """For a component that is (``compiled``) or is not compiled."""
        return compiled if self.channel_stats_group_norm is None else self.channel_stats_group_norm

    def resolved_unfused_linear_bias(self, compiled: bool) -> bool:
        """For a component that is (``compiled``) or is not compiled."""
        return compiled if self.unfused_linear_bias is None else self.unfused_linear_bias

    def resolved_context_per_video(self, compiled: bool) -> bool:
        """For a UNet that is (``compiled``) or is not compiled."""
        return compiled if self.context_per_video is None else self.context_per_video

    def resolved_channels_last(self) -> bool:
        return self.compile != "none" if self.channels_last is None else self.channels_last


def _set_sdpa(module: torch.nn.Module) -> None:
    """diffusers' SDPA processor for every attention; ``VideoContextAttnProcessor`` (SDPA already, and what a UNet's
    ``context_per_video`` relies on) stays."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    for sub in module.modules():
        if isinstance(sub, Attention) and not isinstance(sub.processor, (AttnProcessor2_0, VideoContextAttnProcessor)):
            sub.set_processor(AttnProcessor2_0())


def _efficient_sdpa(tensor: torch.Tensor):
    """SDPA pinned to the memory-efficient kernel for CUDA tensors; no restriction elsewhere."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]) if tensor.is_cuda else contextlib.nullcontext()


class EfficientAttnProcessor:
    """diffusers' SDPA processor with PyTorch's memory-efficient kernel pinned on CUDA (any backend elsewhere).

    For the temporal layers (sequences of 16 frames, tens of thousands of them per call) it beats the cuDNN flash
    kernel that SDPA picks by default on Hopper (``benchmarks/micro_ops.py``)."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, *args, **kwargs):
        with _efficient_sdpa(hidden_states):
            return self.inner(attn, hidden_states, *args, **kwargs)


def _without_norms(attn) -> bool:
    """Whether an ``Attention`` has none of the optional norms the fast processors leave to diffusers' own."""
    return all(getattr(attn, name, None) is None for name in ("spatial_norm", "group_norm", "norm_q", "norm_k"))


class TritonTemporalAttnProcessor:
    """Self-attention through ``customcrafter.kernels.temporal_attention`` (the short-sequence Triton kernel, reading
    the projections' layout as it is; with gradients, its backward kernel too). Anything that kernel does not take — a
    mask, cross-attention, extra norms, float32, the CPU — goes through ``EfficientAttnProcessor`` instead."""

    def __init__(self):
        self.fallback = EfficientAttnProcessor()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        from customcrafter import kernels

        plain = (encoder_hidden_states is None and attention_mask is None and not args and not kwargs
                 and hidden_states.dim() == 3 and _without_norms(attn))
        if not plain:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        with _efficient_sdpa(query):  # for the PyTorch fallback inside, where the kernel does not apply
            out = kernels.temporal_attention(query, key, value, attn.heads)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class VideoContextAttnProcessor:
    """Cross-attention with the context once per video: ``hidden_states`` (N, L, C) are the frames of N // B videos
    (frames of one video contiguous, as the UNet lays them out: row b*T + t), ``encoder_hidden_states`` (B, S, D) one
    context per video. q comes from the frames, k and v from the B contexts only (T times fewer rows through
    ``to_k``/``to_v``, and no per-frame copy of the context), and the attention runs with each video's frames as one
    query sequence (B, T*L, heads, d) against its S keys. Every query row's softmax is over the same keys as per
    frame, so the result is diffusers' ``AttnProcessor2_0`` on the context repeated per frame (up to rounding).

    ``attn.to_q``/``to_k``/``to_v``/``to_out`` are called as modules, so adapters wrapping them (peft LoRA, DWVSS's
    fused weights, forward hooks) work as before. Anything else — a mask, ``norm_cross``, spatial or group norms,
    q/k norms, 4-D input, self-attention, a batch that is not a multiple of the contexts', extra arguments — goes
    through ``AttnProcessor2_0``, with the context repeated per frame where needed."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fallback = AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        context = encoder_hidden_states
        videos = 0 if context is None or context.dim() != 3 else context.shape[0]
        rows = hidden_states.shape[0]
        plain = (videos > 0 and rows % videos == 0 and attention_mask is None and not args and not kwargs
                 and hidden_states.dim() == 3 and attn.norm_cross is None and _without_norms(attn))
        if not plain:
            if videos and rows != videos and rows % videos == 0:
                context = context.repeat_interleave(rows // videos, dim=0, output_size=rows)
            return self.fallback(attn, hidden_states, context, attention_mask, temb, *args, **kwargs)
        length = hidden_states.shape[1]
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(context), attn.to_v(context)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        # (N, L, heads*d) -> (B, heads, T*L, d): each video's frames one after another as its query sequence
        query = query.reshape(videos, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(videos, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(videos, -1, attn.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(rows, length, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _cross_attentions(module: torch.nn.Module) -> list:
    """Every cross-attention ``Attention`` inside ``module``."""
    from diffusers.models.attention_processor import Attention

    return [sub for sub in module.modules() if isinstance(sub, Attention) and getattr(sub, "is_cross_attention", False)]


def use_video_context_attention(unet: torch.nn.Module) -> int:
    """``VideoContextAttnProcessor`` for every cross-attention inside a ``Transformer2DModel`` of ``unet`` whose
    processor is diffusers' plain ``AttnProcessor2_0`` or ``AttnProcessor`` (with the default ``scale_qk``, where the
    two agree); custom processors (a training method's own, for instance) are left alone. Returns how many layers
    changed.

    Only where *every* cross-attention of ``unet`` then has the new processor is ``unet.context_per_video`` set
    (``VideoCrafter2UNet.forward`` then passes the context once per video instead of repeating it per frame);
    otherwise it stays False and the switched layers receive the repeated context, which they handle too. A
    processor replaced later by anything but ``_set_sdpa`` needs ``unet.context_per_video = False`` again."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    count = 0
    for block in unet.modules():
        if type(block).__name__ == "Transformer2DModel":
            for sub in _cross_attentions(block):
                if type(sub.processor) in (AttnProcessor2_0, AttnProcessor) and getattr(sub, "scale_qk", True):
                    sub.set_processor(VideoContextAttnProcessor())
                    count += 1
    layers = _cross_attentions(unet)
    per_video = bool(layers) and all(isinstance(sub.processor, VideoContextAttnProcessor) for sub in layers)
    if hasattr(unet, "context_per_video"):
        unet.context_per_video = per_video
    logger.info("cross-attention context once per video: %d layers switched, %d of %d cross-attentions (%s)",
                count, sum(isinstance(sub.processor, VideoContextAttnProcessor) for sub in layers), len(layers),
                "context passed once per video" if per_video else "context still repeated per frame")
    return count


_TEMPORAL_PROCESSORS = {"efficient": EfficientAttnProcessor, "triton": TritonTemporalAttnProcessor}


def set_temporal_attention(unet: torch.nn.Module, kind: Literal["math", "efficient", "triton"]) -> int:
    """Another processor for every attention inside a temporal transformer (diffusers' plain ``AttnProcessor``
    for 'math', ``EfficientAttnProcessor`` for 'efficient', ``TritonTemporalAttnProcessor`` for 'triton');
    returns how many layers changed."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    count = 0
    for block in unet.modules():
        if type(block).__name__ == "TransformerTemporalModel":
            for sub in block.modules():
                if isinstance(sub, Attention):
                    sub.set_processor(AttnProcessor() if kind == "math" else _TEMPORAL_PROCESSORS[kind]())
                    count += 1
    return count


def _channels_last(module: torch.nn.Module) -> None:
    """Channels-last weights for the 2D convs (NHWC) and 3D convs (NDHWC); ``Module.to`` cannot mix the two."""
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Conv2d, torch.nn.Conv3d)):
            fmt = torch.channels_last if isinstance(sub, torch.nn.Conv2d) else torch.channels_last_3d
            sub.weight.data = sub.weight.data.contiguous(memory_format=fmt)


def compile_unet(unet: torch.nn.Module, mode: Literal["regional", "full"] = "regional",
                 compile_mode: str | None = None, backend: str = "inductor", options: dict | None = None) -> None:
    """Compile the UNet in place: each repeated block (regional) or the whole forward (full). ``backend``:
    torch.compile's (tests trace with 'eager' / 'aot_eager', which compile in seconds on a CPU); ``options``:
    torch.compile's, instead of a ``compile_mode``."""
    import torch._dynamo

    # Many instances of each block class with a handful of distinct shapes each: allow enough cached graphs.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    how = {"options": options} if options is not None else {"mode": compile_mode}
    if mode == "full":
        unet.compile(backend=backend, fullgraph=False, dynamic=False, **how)
        return
    count = 0
    for sub in unet.modules():
        if type(sub).__name__ in UNET_REPEATED_BLOCKS:
            sub.compile(backend=backend, dynamic=False, **how)
            count += 1
    if not count:
        raise ValueError(f"no block of {UNET_REPEATED_BLOCKS} in {type(unet).__name__}: nothing to compile")
    logger.info("regional torch.compile: %d UNet blocks", count)


def _rewrite_layers(module: torch.nn.Module, config: SpeedConfig, compiled: bool) -> None:
    """The exact layer rewrites of ``customcrafter.fusions`` that ``config`` asks for, in ``module`` (which is or
    is not compiled), and for a UNet whose forward can pass the context once per video (``context_per_video``)
    its cross-attention processors. All are differentiable; the fused GEGLU, inference-only, is switched
    separately."""
    from customcrafter import fusions

    if config.resolved_subpixel_upsample():
        fusions.use_subpixel_upsamplers(module)
    if config.resolved_channel_stats_group_norm(compiled):
        fusions.use_channel_stats_group_norm(module)
    if config.resolved_unfused_linear_bias(compiled):
        fusions.use_unfused_bias_linears(module)
    if hasattr(module, "context_per_video") and config.resolved_context_per_video(compiled):
        use_video_context_attention(module)


def _layer_rewrites(pipe, config: SpeedConfig) -> None:
    """The layer rewrites of ``customcrafter.fusions`` that ``config`` asks for, in the UNet and the VAE decoder."""
    from customcrafter import fusions

    _rewrite_layers(pipe.unet, config, config.compile != "none")
    if pipe.vae is not None:
        _rewrite_layers(pipe.vae.decoder, config, config.resolved_compile_vae())
    if config.fused_geglu:
        fusions.use_fused_geglu(pipe.unet)


def prepare_unet_for_compiled_training(unet: torch.nn.Module) -> None:
    """What compiled sampling runs the UNet with, for a UNet that is compiled to train: channels-last convolution
    weights and the exact, differentiable layer rewrites (sub-pixel upsampling, channel-statistics GroupNorm,
    unfused linear bias, cross-attention keys and values once per video). Same function up to rounding
    (tests/test_train_compile.py)."""
    _channels_last(unet)
    _rewrite_layers(unet, SpeedConfig(), compiled=True)


def optimize_pipeline(pipe, config: SpeedConfig | None = None):
    """Apply ``config`` to ``pipe`` in place (and return it). Call after moving the pipeline to its device and
    after loading subject modules (LoRA layers must exist before compiling; DWVSS fuses their scales into the
    weights, so no recompilation happens between its phases)."""
    config = config or SpeedConfig()
    device = pipe.unet.device
    pipe.decode_chunk_size = config.decode_chunk_size
    if device.type != "cuda":
        if config.dtype != "fp32" or config.compile != "none":
            logger.info("optimize_pipeline on %s: float32 and eager mode (GPU-only settings ignored)", device.type)
        for component in (pipe.unet, pipe.text_encoder, pipe.vae):
            if component is not None:
                component.to(dtype=torch.float32)
        return pipe
    if config.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    dtype = DTYPES[config.dtype]
    for component in (pipe.unet, pipe.text_encoder, pipe.vae):
        if component is not None:
            component.to(dtype=dtype)
    if config.sdpa:
        _set_sdpa(pipe.unet)
        if pipe.vae is not None:
            _set_sdpa(pipe.vae)
    if config.sdpa and config.temporal_attention != "sdpa":
        logger.info("temporal attention '%s': %d layers", config.temporal_attention,
                    set_temporal_attention(pipe.unet, config.temporal_attention))
    if config.resolved_channels_last():
        for component in (pipe.unet, pipe.vae):
            if component is not None:
                _channels_last(component)
    _layer_rewrites(pipe, config)
    _compile_parts(pipe, config)
    return pipe


def _compile_parts(pipe, config: SpeedConfig) -> None:
    """torch.compile the UNet, the VAE decoder and the text encoder as ``config`` asks, all in one mode."""
    how = config.compile_kwargs()
    if config.compile != "none":
        compile_unet(pipe.unet, config.compile, how.get("mode"), options=how.get("options"))
    if config.resolved_compile_vae() and pipe.vae is not None:
        pipe.vae.decoder.compile(dynamic=False, **how)
    if config.resolved_compile_text() and pipe.text_encoder is not None:
        pipe.text_encoder.compile(dynamic=False, **how)
