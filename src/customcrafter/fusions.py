"""Rewrites of layers into forms that run faster under ``torch.compile``: the same function (up to rounding), less
GPU time.

``channel_stats_group_norm``: GroupNorm from per-channel statistics. On channels-last activations a group's
channels are a few contiguous values in every row, and inductor's own GroupNorm reduction walks them group by group
(worst where the input is a concatenation whose groups straddle the two sources: the UNet's up-block resnets, 2.2 ms
for one level-0 GroupNorm + SiLU against 0.21 ms this way, ``benchmarks/micro_ops.py --only groupnorm``). Computing
each channel's mean and variance over all positions first keeps the channels as the contiguous, kept dimension.
``use_channel_stats_group_norm(module)`` switches every ``nn.GroupNorm`` inside a model over.

``subpixel_upsample_conv``: nearest 2x upsampling followed by a 3x3 convolution (diffusers' ``Upsample2D``: the
UNet's three upsamplers and the VAE decoder's three) equals a 2x2 convolution on the *input* per output pixel
parity (the four run as one convolution with four times the output channels), interleaved. Each output pixel of
the original sees a 3x3 window of the upsampled map, i.e. only a 2x2 window of the input with some taps repeated,
so the repeated taps' weights can be summed beforehand: 16 multiply-adds per pixel and channel pair instead of 36
(2.25x fewer FLOPs), and the 4x-sized upsampled map is never written. The summed weights are computed in float32
from the layer's own weights at every call, so they never go stale. ``use_subpixel_upsamplers(module)`` switches
every eligible ``Upsample2D`` inside a model over (its state dict is unchanged).

``unfused_bias_linear``: a linear layer as a plain matmul followed by its bias add. Under ``torch.compile`` the add
fuses into the next pointwise or normalization kernel, and cuBLAS runs its plain GEMM: its bias-epilogue GEMMs ran up
to 1.6x slower at the UNet's level-0 shapes (H100: 81920x320 by 320x320 0.070 against 0.043 ms). Inductor makes this
split itself only when every consumer of the output is pointwise, which leaves the attention output projections and
the feed-forward layers with the slow kernel. ``use_unfused_bias_linears(module)`` switches every biased
``nn.Linear`` inside a model over.

``fused_geglu``: the feed-forward's GEGLU (projection, split, ``value * gelu(gate)``) as one Triton GEMM with the
gating in its epilogue (``customcrafter.kernels.geglu``), so the 2N-wide projection output is never written and read
back: where K is at most ``FUSED_GEGLU_MAX_K`` (the UNet's levels 0-1), elsewhere the layer's own path.
``use_fused_geglu(module)`` switches every diffusers ``GEGLU`` inside a model over.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from customcrafter.kernels import (
    geglu,
    geglu_supported,
    group_norm_scale_shift,
    group_norm_scale_shift_reference,
)

__all__ = ["channel_stats_group_norm", "ChannelStatsGroupNorm", "use_channel_stats_group_norm", "subpixel_kernels",
           "subpixel_upsample_conv", "SubpixelUpsample2D", "use_subpixel_upsamplers", "SUBPIXEL_MIN_POSITIONS",
           "unfused_bias_linear", "UnfusedBiasLinear", "use_unfused_bias_linears", "FUSED_GEGLU_MAX_K", "FusedGEGLU",
           "use_fused_geglu"]

logger = logging.getLogger(__name__)


def channel_stats_group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.group_norm`` computed from per-channel statistics: mean and variance of each channel over all positions
    (one Welford reduction whose kept dim, the channels, is the contiguous one in channels-last memory), then each
    group's mean and variance from its channels' (exact for equal counts: the variance of the group is the mean of
    the channels' variances plus the variance of their means), then one scale-and-shift pass."""
    n, c = x.shape[:2]
    dims = list(range(2, x.dim()))
    compute = torch.promote_types(x.dtype, torch.float32)
    var_c, mean_c = torch.var_mean(x.to(compute), dim=dims, correction=0)
    # 5-D inputs (the temporal convolutions' and transformers' GroupNorms): one small kernel on CUDA at inference, so
    # that the pass over x below is a multiply-add per element instead of recomputing the group statistics per
    # element (customcrafter.kernels). 4-D inputs (per-frame resnet GroupNorms) keep the form inductor inlines: it
    # ran faster there (benchmarks/micro_ops.py --only gn_scale_shift, RESULTS.md session 10)
    scale_shift = group_norm_scale_shift if x.dim() == 5 else group_norm_scale_shift_reference
    scale, shift = scale_shift(mean_c, var_c, weight, bias, num_groups, eps)
    shape = (n, c) + (1,) * len(dims)
    return (x.to(compute) * scale.reshape(shape) + shift.reshape(shape)).to(x.dtype)


def subpixel_kernels(weight: torch.Tensor) -> torch.Tensor:
    """``(out, in, 3, 3)`` -> ``(2, 2, out, in, 2, 2)``: the 2x2 kernel of each output parity ``(row, column)``.

    Along one axis the upsampled map's taps -1, 0, +1 fall on input offsets (-1, 0, 0) for even output positions
    and (0, 0, +1) for odd ones; taps on the same input offset are summed."""
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))  # sums in float32 at least
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], dim=2),  # even rows: input rows i-1, i
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], dim=2))  # odd rows: input rows i, i+1
    return torch.stack([torch.stack([torch.stack([r[..., 0], r[..., 1] + r[..., 2]], dim=-1),
                                     torch.stack([r[..., 0] + r[..., 1], r[..., 2]], dim=-1)]) for r in rows])


def subpixel_upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)`` for a 3x3 ``weight``,
    computed as 2x2 convolutions on ``x`` (see the module docstring). ``x``: ``(N, C, H, W)``, any memory
    format; the result keeps ``x``'s."""
    n, _, h, w = x.shape
    out_channels = weight.shape[0]
    # One convolution computes all four parities as 4x the output channels over the padded input; parity (a, b)
    # is the (h, w) window of its channel block that starts at (a, b).
    kernels = subpixel_kernels(weight).to(x.dtype).reshape(4 * out_channels, -1, 2, 2)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernels, None if bias is None else bias.repeat(4))
    y = y.unflatten(1, (2, 2, out_channels))  # (N, a, b, C, H + 1, W + 1)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if channels_last:
        out = x.new_empty(n, h, 2, w, 2, out_channels)
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, a, :, b] = y[:, a, b, :, a:a + h, b:b + w].permute(0, 2, 3, 1)
        return out.view(n, 2 * h, 2 * w, out_channels).permute(0, 3, 1, 2)
    out = x.new_empty(n, out_channels, h, 2, w, 2)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, :, a, :, b] = y[:, a, b, :, a:a + h, b:b + w]
    return out.view(n, out_channels, 2 * h, 2 * w)


def unfused_bias_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as ``F.linear(x, weight) + bias``: the matmul's output is rounded to its dtype
    before the bias is added (one more rounding than cuBLAS's bias epilogue, as inductor's own split does)."""
    out = F.linear(x, weight)
    return out if bias is None else out + bias


def _subpixel_eligible(upsampler: torch.nn.Module) -> bool:
    conv = getattr(upsampler, "conv", None) if getattr(upsampler, "name", "conv") == "conv" else None
    return (getattr(upsampler, "use_conv", False) and not getattr(upsampler, "use_conv_transpose", True)
            and getattr(upsampler, "interpolate", False) and getattr(upsampler, "norm", None) is None
            and isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


#: Input maps smaller than this (positions per image) keep the plain form: there cuDNN's 2x2 convolution with 4x the
#: output channels runs far below the 3x3 one (H100: the UNet's 5x8 and 10x16 upsamplers got slower, the 20x32 one
#: and the VAE decoder's 40x64 to 160x256 faster; ``benchmarks/micro_ops.py --only upsample``).
SUBPIXEL_MIN_POSITIONS = 512


def _subpixel_forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
    """``Upsample2D.forward`` in the sub-pixel form; other size requests and small maps take the original path."""
    h, w = hidden_states.shape[-2:]
    if (output_size is not None and tuple(output_size) != (2 * h, 2 * w)) or h * w < SUBPIXEL_MIN_POSITIONS:
        return type(self).__mro__[1].forward(self, hidden_states, output_size, *args, **kwargs)
    return subpixel_upsample_conv(hidden_states, self.conv.weight, self.conv.bias)


def _group_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    return channel_stats_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    return unfused_bias_linear(x, self.weight, self.bias)


#: The fused GEGLU kernel is used for projections with at most this many input channels. H100, ms per call with CUDA
#: graphs (``benchmarks/probe_geglu.py``), fused kernel against cuBLAS's 2N-wide GEMM + the gating pass inductor
#: generates in the UNet: K 320 (level 0) 0.34 against 0.26 + 0.21; K 640 (level 1) 0.30 against 0.23 + 0.11;
#: K 1280 (levels 2-3) 0.28 against 0.21 + 0.06, no gain (session 26, with the kernel's polynomial GELU; 0.39 and
#: 0.32 with libdevice's erf before).
FUSED_GEGLU_MAX_K = 640


def _geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``GEGLU.forward`` through the fused kernel where it applies; other layers (a projection that is not a plain
    linear layer, e.g. wrapped by an adapter, large K, no CUDA, gradients) take the original path."""
    proj = self.proj
    if (not args and not kwargs and isinstance(proj, torch.nn.Linear) and proj.in_features <= FUSED_GEGLU_MAX_K
            and geglu_supported(hidden_states, proj.weight, proj.bias)):
        return geglu(hidden_states, proj.weight, proj.bias)
    return type(self).__mro__[1].forward(self, hidden_states, *args, **kwargs)


class SubpixelUpsample2D:
    """Marker base of the classes ``use_subpixel_upsamplers`` gives each eligible ``Upsample2D`` instance: a
    subclass of its own class whose ``forward`` is the sub-pixel form (parameters, buffers, state dict untouched)."""


class ChannelStatsGroupNorm:
    """Marker base of the classes ``use_channel_stats_group_norm`` gives each ``nn.GroupNorm`` instance."""


class UnfusedBiasLinear:
    """Marker base of the classes ``use_unfused_bias_linears`` gives each biased ``nn.Linear`` instance."""


class FusedGEGLU:
    """Marker base of the classes ``use_fused_geglu`` gives each diffusers ``GEGLU`` instance."""


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _swap_class(module: torch.nn.Module, marker: type, forward) -> None:
    """Give ``module`` a subclass of its class and ``marker`` with ``forward``: behaviour changes, parameters,
    buffers, hooks and state dict stay (``isinstance`` against the original class still holds)."""
    cls = type(module)
    if (cls, marker) not in _SUBCLASSES:
        _SUBCLASSES[cls, marker] = type(f"{marker.__name__}{cls.__name__}", (cls, marker),
                                        {"forward": forward, "__module__": __name__})
    module.__class__ = _SUBCLASSES[cls, marker]


def _switch_all(module: torch.nn.Module, eligible, marker: type, forward, what: str) -> int:
    """Give every ``eligible`` submodule of ``module`` not yet switched the ``marker`` subclass with ``forward``;
    returns how many switched."""
    count = 0
    for sub in module.modules():
        if not isinstance(sub, marker) and eligible(sub):
            _swap_class(sub, marker, forward)
            count += 1
    logger.info("%s: %d layers", what, count)
    return count


def use_subpixel_upsamplers(module: torch.nn.Module) -> int:
    """Switch every eligible ``Upsample2D`` inside ``module`` to the sub-pixel form; returns how many switched."""
    from diffusers.models.upsampling import Upsample2D

    return _switch_all(module, lambda sub: isinstance(sub, Upsample2D) and _subpixel_eligible(sub),
                       SubpixelUpsample2D, _subpixel_forward, "sub-pixel upsampling")


def use_channel_stats_group_norm(module: torch.nn.Module) -> int:
    """Switch every ``nn.GroupNorm`` inside ``module`` to ``channel_stats_group_norm``; returns how many switched."""
    return _switch_all(module, lambda sub: isinstance(sub, torch.nn.GroupNorm), ChannelStatsGroupNorm,
                       _group_norm_forward, "channel-statistics GroupNorm")


def use_unfused_bias_linears(module: torch.nn.Module) -> int:
    """Switch every ``nn.Linear`` with a bias inside ``module`` to ``unfused_bias_linear``; returns how many switched.
    Layers without a bias are left alone (they already run the plain matmul)."""
    return _switch_all(module, lambda sub: isinstance(sub, torch.nn.Linear) and sub.bias is not None,
                       UnfusedBiasLinear, _linear_forward, "unfused linear bias")


def use_fused_geglu(module: torch.nn.Module) -> int:
    """Switch every diffusers ``GEGLU`` inside ``module`` to the fused kernel where it applies (``_geglu_forward``);
    returns how many switched."""
    from diffusers.models.activations import GEGLU

    return _switch_all(module, lambda sub: isinstance(sub, GEGLU), FusedGEGLU, _geglu_forward, "fused GEGLU")
