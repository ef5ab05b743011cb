"""The temporal layers' attention pinned to the memory-efficient kernel on a GPU (opt-in: ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_efficient_temporal_attention_matches_default_sdpa_forward_and_backward(dtype):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from customcrafter.performance import EfficientAttnProcessor

    torch.manual_seed(0)
    layer = Attention(query_dim=320, heads=5, dim_head=64).cuda().to(dtype)
    x = torch.randn(512, 16, 320, device="cuda", dtype=dtype, requires_grad=True)  # (positions, frames, channels)
    outputs, grads = [], []
    for processor in (AttnProcessor2_0(), EfficientAttnProcessor()):
        layer.set_processor(processor)
        x.grad = None
        out = layer(x)
        out.float().square().mean().backward()
        outputs.append(out.detach().float())
        grads.append(x.grad.detach().float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in ((outputs[0], outputs[1]), (grads[0], grads[1])):
        assert ((a - b).norm() / a.norm()).item() < tol


def test_efficient_processor_pins_the_kernel_on_cuda():
    """With only the memory-efficient kernel allowed, a shape it cannot run must fail: proof that it is pinned."""
    from diffusers.models.attention_processor import Attention

    from customcrafter.performance import EfficientAttnProcessor

    layer = Attention(query_dim=64, heads=1, dim_head=64).cuda().double()
    layer.set_processor(EfficientAttnProcessor())
    with pytest.raises(RuntimeError):  # float64 has no memory-efficient kernel; SDPA's own choice would run it
        layer(torch.randn(4, 16, 64, device="cuda", dtype=torch.float64))
