"""DWVSS: the schedule, phase fusing (fast path) vs the unfused LoRA computation, bit-exact restore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from customcrafter.dwvss import (
    DWVSSCallback,
    DWVSSConfig,
    LoraPhaseFuser,
    dwvss_plan,
    dwvss_sampling,
    parse_dwvss,
)


def test_paper_schedule_is_k_steps_at_lambda_s_then_lambda_l():
    plan = dwvss_plan(DWVSSConfig(), 50)
    assert plan.scales == (0.4,) * 5 + (0.8,) * 45
    assert not plan.skipped
    assert dwvss_plan(DWVSSConfig(lambda_s=0.1, lambda_l=0.9, k=10), 20).scales == (0.1,) * 10 + (0.9,) * 10
    assert dwvss_plan(None, 7).scales == (1.0,) * 7  # no DWVSS = plain LoRA sampling


def test_reference_mode_skips_step_k_minus_1():
    plan = dwvss_plan(DWVSSConfig(mode="reference"), 50)
    assert plan.skipped == frozenset({4})  # t = 901 with 50 DDIM steps (981, 961, 941, 921, [901], 881, ...)
    effective = [s for i, s in enumerate(plan.scales) if i not in plan.skipped]
    assert effective == [0.4] * 4 + [0.8] * 45


@pytest.mark.parametrize("k, steps", [(5, 5), (6, 5), (50, 50)])
def test_reference_mode_refuses_k_at_or_above_the_steps(k, steps):
    """K >= steps in reference mode would skip the final step (a latent left noisy): a usage error naming the field
    and both numbers, from SampleConfig's validation (CLI, pipeline and library), and from dwvss_plan itself."""
    from customcrafter.config import ConfigError, load_config
    from customcrafter.sampling import SampleConfig

    schedule = DWVSSConfig(k=k, mode="reference")
    message = rf"dwvss\.k \({k}\) must be below num_inference_steps \({steps}\) in reference mode"
    with pytest.raises(ValueError, match=message):
        SampleConfig(num_inference_steps=steps, dwvss=schedule)
    with pytest.raises(ValueError, match=message):
        dwvss_plan(schedule, steps)
    with pytest.raises(ConfigError, match=message):  # the pipeline's and the CLI's --set path
        load_config(SampleConfig, overrides=[f"dwvss.k={k}", "dwvss.mode=reference"], num_inference_steps=steps)
    config = SampleConfig(num_inference_steps=k + 1, dwvss=schedule)  # a step after k: the last one runs
    assert dwvss_plan(config.dwvss, k + 1).skipped == frozenset({k - 1})
    with pytest.raises(ValueError, match=message):  # changing the steps afterwards is checked too
        config.num_inference_steps = steps


def test_paper_mode_with_k_at_or_above_the_steps_runs_every_step_at_lambda_s():
    """Algorithm 1 as written: every step is one of the first K; no step is lost (the tiny presets rely on it)."""
    from customcrafter.sampling import SampleConfig

    assert SampleConfig(num_inference_steps=3).dwvss.k == 5
    assert dwvss_plan(DWVSSConfig(k=5), 3) == dwvss_plan(DWVSSConfig(k=3), 3)
    assert dwvss_plan(DWVSSConfig(k=5), 3).scales == (0.4,) * 3 and not dwvss_plan(DWVSSConfig(k=5), 3).skipped


def test_parse_dwvss_and_errors():
    assert parse_dwvss("0.4,0.8,5") == DWVSSConfig()
    assert parse_dwvss("0.2, 1.0, 10, reference").mode == "reference"
    with pytest.raises(ValueError, match="--dwvss"):
        parse_dwvss("0.4,0.8")
    with pytest.raises(ValueError, match="--dwvss"):
        parse_dwvss("a,b,c")
    # a value the config refuses: one line naming the flag, the text and the field
    with pytest.raises(ValueError, match=r"^--dwvss '0\.4,0\.8,5,foo': mode: Input should be 'paper' or "
                                         r"'reference'$"):
        parse_dwvss("0.4,0.8,5,foo")
    with pytest.raises(ValueError, match=r"^--dwvss '-1,0\.8,5': lambda_s: Input should be greater than or equal"):
        parse_dwvss("-1,0.8,5")


class _Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.to_q(x) * torch.tanh(self.to_k(x)) + self.to_v(x)


class _Net(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.attn1, self.attn2 = _Attention(dim), _Attention(dim)

    def forward(self, x):
        return self.attn2(self.attn1(x))


def _lora_net(adapters=("a",)):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    net = _Net()
    for name in adapters:
        # init_lora_weights=False: random up-projections, so the adapter changes the output.
        config = LoraConfig(r=4, lora_alpha=4, target_modules=r".*\.(to_q|to_k|to_v)", init_lora_weights=False)
        net = inject_adapter_in_model(config, net, adapter_name=name)
    for module in net.modules():
        if hasattr(module, "set_adapter") and hasattr(module, "lora_A"):
            module.set_adapter(list(adapters))
    return net


def _unfused_output(net, x, scale):
    """The reference computation: the LoRA branch in the forward pass, scaled with peft's set_scale."""
    layers = [m for m in net.modules() if hasattr(m, "lora_A") and hasattr(m, "set_scale")]
    for layer in layers:
        for name in layer.lora_A:
            layer.set_scale(name, scale)
    try:
        return net(x)
    finally:
        for layer in layers:
            for name in layer.lora_A:
                layer.set_scale(name, 1.0)


@torch.no_grad()
def test_fused_phases_match_unfused_lora_and_restore_bit_exactly():
    net = _lora_net()
    x = torch.randn(3, 16)
    originals = {k: v.clone() for k, v in net.state_dict().items()}
    for layer in (m for m in net.modules() if hasattr(m, "lora_A")):
        layer._disable_adapters = True
    base = net(x)
    for layer in (m for m in net.modules() if hasattr(m, "lora_A")):
        layer._disable_adapters = False
    expected = {s: _unfused_output(net, x, s) for s in (0.4, 0.8, 1.0)}
    assert not torch.allclose(expected[0.4], expected[0.8])  # the adapter matters

    with LoraPhaseFuser(net) as fuser:
        assert len(fuser.layers) == 6
        for scale in (0.4, 0.8, 1.0, 0.4):
            fuser.set_scale(scale)
            torch.testing.assert_close(net(x), expected[scale], rtol=1e-5, atol=1e-6)
        fuser.set_scale(0.0)
        assert torch.equal(net(x), base)  # λ = 0: the base model bit for bit
    for key, value in net.state_dict().items():
        assert torch.equal(value, originals[key]), key
    torch.testing.assert_close(net(x), expected[1.0])  # the LoRA branch is live again


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fusing_at_a_scale_is_the_per_layer_sum_bit_for_bit_with_deltas_computed_once(dtype, monkeypatch):
    """Each re-fusing writes exactly ``W0 + scale * sum_a delta_a`` of every layer (the delta in the weight's dtype,
    as fusing layer by layer did), and peft's ``get_delta_weight`` runs once per layer and adapter when the block is
    entered, not at every phase: at the start of a video the GPU waits for that host work."""
    from peft.tuners.lora import Linear as LoraLinear

    net = _lora_net(adapters=("a", "b")).to(dtype)
    layers = [m for m in net.modules() if isinstance(m, LoraLinear)]
    originals = [m.get_base_layer().weight.clone() for m in layers]
    expected_delta = [sum(m.get_delta_weight(a) for a in ("a", "b")).to(dtype) for m in layers]
    calls = []
    real = LoraLinear.get_delta_weight
    monkeypatch.setattr(LoraLinear, "get_delta_weight", lambda self, a: (calls.append(a), real(self, a))[1])
    with LoraPhaseFuser(net) as fuser:
        assert len(calls) == 2 * len(layers) == 12
        for scale in (0.4, 0.8, 0.0, 0.4):
            fuser.set_scale(scale)
            for layer, original, delta in zip(layers, originals, expected_delta, strict=True):
                expected = original.clone()
                if scale:
                    expected.add_(delta, alpha=scale)
                assert torch.equal(layer.get_base_layer().weight, expected)
        assert len(calls) == 12
    assert all(torch.equal(m.get_base_layer().weight, o) for m, o in zip(layers, originals, strict=True))


@torch.no_grad()
def test_weights_restored_when_sampling_raises():
    net = _lora_net()
    originals = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), dwvss_sampling(net, DWVSSConfig(), 10) as callback:
        callback(None, 0, 981)
        callback(None, 5, 881)
        raise RuntimeError("boom")
    assert all(torch.equal(v, originals[k]) for k, v in net.state_dict().items())


def test_callback_fuses_at_phase_boundaries_only_and_records_scales():
    net = _lora_net(adapters=("a", "b"))
    plan = dwvss_plan(DWVSSConfig(), 50)
    with LoraPhaseFuser(net) as fuser:
        calls = []
        original = fuser.set_scale
        fuser.set_scale = lambda s: (calls.append(s), original(s))[1]
        callback = DWVSSCallback(fuser, plan)
        for index in range(50):
            callback(None, index, 981 - 20 * index)
    assert callback.recorded == list(plan.scales)
    assert calls == [0.4, 0.8]  # two fusings per video, not one per step


def test_reference_mode_skip_leaves_latent_unchanged():
    from diffusers import DDIMScheduler

    class _Pipe:
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

    pipe = _Pipe()
    pipe.scheduler.set_timesteps(50)
    net = _lora_net()
    sample, output = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    with dwvss_sampling(net, DWVSSConfig(mode="reference"), 50) as callback:
        results = []
        for index, t in enumerate(pipe.scheduler.timesteps[:6]):
            callback(pipe, index, t)
            results.append(pipe.scheduler.step(output, t, sample).prev_sample)
    assert callback.skipped == [4]
    assert torch.equal(results[4], sample)
    assert not torch.equal(results[3], sample) and not torch.equal(results[5], sample)
