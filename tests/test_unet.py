"""VideoCrafter2UNet: golden output through the converter, fps conditioning, gradient checkpointing, peft LoRA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from customcrafter.loading import TINY_UNET_CONFIG
from customcrafter.models.unet import DEFAULT_FPS, VideoCrafter2UNet


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def tiny_unet() -> VideoCrafter2UNet:
    from customcrafter.loading import build_tiny_pipeline

    return build_tiny_pipeline().unet


def _inputs(batch: int = 2, frames: int = 3, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, frames, size, size, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 7, 32, generator=g))


def test_golden_unet_output_through_converter(fixtures_dir, tmp_path):
    from customcrafter.convert import convert_checkpoint

    folder = convert_checkpoint(fixtures_dir / "tiny_lvdm_checkpoint.safetensors", tmp_path / "conv",
                                config=fixtures_dir / "tiny_lvdm_config.yaml", components=["unet"])
    unet = VideoCrafter2UNet.from_pretrained(folder / "unet").eval()
    g = load_file(str(fixtures_dir / "tiny_lvdm_goldens.safetensors"))
    with torch.no_grad():
        out = unet(g["unet.x"], g["unet.timesteps"], g["unet.context"], fps=g["unet.fps"]).sample
    err = rel_err(out, g["unet.out"])
    print(f"unet golden rel err {err:.2e}")
    assert err <= 1e-4


def test_fps_is_an_input_and_defaults_to_28(tiny_unet):
    x, t, c = _inputs()
    with torch.no_grad():
        at_28 = tiny_unet(x, t, c, fps=28).sample
        at_8 = tiny_unet(x, t, c, fps=8).sample
        default = tiny_unet(x, t, c).sample
        per_sample = tiny_unet(x, t, c, fps=torch.tensor([28, 8])).sample
    assert DEFAULT_FPS == 28 and torch.equal(default, at_28)
    assert rel_err(at_8, at_28) > 1e-3  # the fps embedding really reaches the output
    torch.testing.assert_close(per_sample[0], at_28[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_sample[1], at_8[1], rtol=1e-5, atol=1e-6)
    assert at_28.shape == x.shape


def test_without_fps_cond_has_no_fps_embedding():
    config = dict(TINY_UNET_CONFIG, fps_cond=False)
    unet = VideoCrafter2UNet(**config)
    assert not hasattr(unet, "fps_embedding")
    assert not any(k.startswith("fps_embedding") for k in unet.state_dict())


def test_one_latent_for_several_contexts_equals_the_repeated_latent(tiny_unet):
    """CFG: the latents once with the (negative, positive) contexts give what the latents repeated give, while the
    first resnet and temporal convolution run on half the batch. In float64: the tiny random UNet amplifies float32
    rounding (different batch sizes round differently) to ~1e-3."""
    unet = VideoCrafter2UNet.from_config(tiny_unet.config)
    unet.load_state_dict(tiny_unet.state_dict())
    unet.double().eval()
    x, _, _ = _inputs(batch=2)
    x = x.double()
    contexts = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t, fps = torch.tensor([10, 700]), torch.tensor([8, 28])
    calls = []
    unet.down_blocks[0].resnets[0].register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
    with torch.no_grad():
        shared = unet(x, t, contexts, fps=fps).sample
        repeated = unet(x.repeat(2, 1, 1, 1, 1), t.repeat(2), contexts, fps=fps.repeat(2)).sample
    assert calls == [2 * 3, 4 * 3]  # (batch × frames) rows: the shared call ran the first resnet once per latent
    assert shared.shape == repeated.shape == (4, 4, 3, 8, 8)
    torch.testing.assert_close(shared, repeated, rtol=1e-9, atol=1e-10)
    # the negative halves differ from the positive ones: the contexts did reach the shared latents
    assert (shared[:2] - shared[2:]).abs().max() > 1e-3

    with pytest.raises(ValueError, match="not a multiple of the sample's batch 2"):
        unet(x, t, contexts[:3], fps=fps)


def test_one_latent_for_several_contexts_under_gradient_checkpointing(tiny_unet):
    unet = VideoCrafter2UNet.from_config(tiny_unet.config)
    unet.load_state_dict(tiny_unet.state_dict())
    unet.enable_gradient_checkpointing()
    unet.double().eval()  # no dropout: both calls see the same network
    x, t, _ = _inputs(batch=1, frames=2)
    x = x.double()
    contexts = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    shared = unet(x, t, contexts, fps=16).sample
    repeated = unet(x.repeat(2, 1, 1, 1, 1), t.repeat(2), contexts, fps=16).sample
    torch.testing.assert_close(shared, repeated, rtol=1e-9, atol=1e-10)
    shared.square().mean().backward()  # gradients flow through the repeated activations
    assert unet.conv_in.weight.grad is not None and unet.conv_in.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients(tiny_unet):
    unet = VideoCrafter2UNet.from_config(tiny_unet.config)
    unet.load_state_dict(tiny_unet.state_dict())
    unet.train()
    x, t, c = _inputs(batch=1, frames=2)

    def grads():
        torch.manual_seed(0)  # training mode: the temporal convs' dropout (0.1, as the original) draws the same masks
        unet.zero_grad()
        unet(x, t, c, fps=16).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters()}

    reference = grads()
    calls = []

    def counting_checkpoint(module, *args):
        calls.append(module)
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)

    unet.enable_gradient_checkpointing(gradient_checkpointing_func=counting_checkpoint)
    checkpointed = grads()
    blocks = len(unet.down_blocks) + 1 + len(unet.up_blocks)
    assert len(calls) == blocks  # every down/mid/up block ran under checkpointing
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    calls.clear()
    with torch.no_grad():
        unet(x, t, c)
    assert not calls  # inference does not checkpoint
    unet.disable_gradient_checkpointing()

    # the default (no function of the caller's): torch's non-reentrant checkpoint, keyword arguments passed through
    checkpoint = torch.utils.checkpoint.checkpoint
    default_calls = []

    def spy(function, *args, **kwargs):
        default_calls.append(kwargs.get("use_reentrant"))
        return checkpoint(function, *args, **kwargs)

    torch.utils.checkpoint.checkpoint = spy
    try:
        unet.enable_gradient_checkpointing()
        by_default = grads()
    finally:
        torch.utils.checkpoint.checkpoint = checkpoint
        unet.disable_gradient_checkpointing()
    assert default_calls == [False] * blocks
    for name, grad in reference.items():
        torch.testing.assert_close(by_default[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_peft_lora_scales_fuses_and_deletes(tiny_unet):
    # float64: the tiny random UNet amplifies float32 rounding to ~1e-3 (merged weights round differently from the
    # separate LoRA matmuls), which would hide a wrong scale or a half-undone fuse; in float64 it is ~1e-13.
    unet = VideoCrafter2UNet.from_config(tiny_unet.config)
    unet.load_state_dict(tiny_unet.state_dict())
    unet.eval().to(torch.float64)
    x, t, c = _inputs()
    x, c = x.double(), c.double()
    with torch.no_grad():
        base = unet(x, t, c).sample
    target = r".*\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=target, init_lora_weights=False), adapter_name="a")
    unet.to(torch.float64)  # the new LoRA layers too
    with torch.no_grad():
        unet.set_adapters(["a"], weights=[1.0])
        full = unet(x, t, c).sample
        unet.set_adapters(["a"], weights=[0.5])
        half = unet(x, t, c).sample
        unet.set_adapters(["a"], weights=[0.0])
        off = unet(x, t, c).sample
        unet.disable_adapters()
        disabled = unet(x, t, c).sample
        unet.enable_adapters()
        unet.set_adapters(["a"], weights=[1.0])
        unet.fuse_lora(lora_scale=1.0)
        fused = unet(x, t, c).sample
        unet.unfuse_lora()
        unet.set_adapters(["a"], weights=[0.5])
        unet.fuse_lora(lora_scale=1.0)
        fused_half = unet(x, t, c).sample
        unet.unfuse_lora()
        unet.delete_adapters("a")
        deleted = unet(x, t, c).sample
    assert rel_err(full, base) > 1e-3
    assert rel_err(half, full) > 1e-4 and rel_err(half, base) > 1e-4
    assert torch.equal(off, disabled)
    assert rel_err(off, base) < 1e-12  # weight 0 is the model with its adapters switched off
    assert rel_err(fused, full) < 1e-10  # merged weights: the same function
    assert rel_err(fused_half, half) < 1e-10  # the adapter weight is merged with the update
    assert rel_err(deleted, base) < 1e-10  # unfuse subtracts the delta again


def test_save_and_load_round_trip(tiny_unet, tmp_path):
    tiny_unet.save_pretrained(tmp_path / "unet")
    loaded = VideoCrafter2UNet.from_pretrained(tmp_path / "unet").eval()
    assert loaded.config.fps_cond and loaded.config.attention_head_dim == 16
    x, t, c = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, c, fps=8).sample, tiny_unet(x, t, c, fps=8).sample)


def test_checkpointed_unet_compiles_whole_and_gives_the_same_gradients(tiny_unet):
    """``compile: full`` with gradient checkpointing: dynamo must trace the checkpointed blocks into the one graph.
    (Handing the blocks to checkpoint as ``functools.partial`` made dynamo give up on the whole forward, which then
    ran eagerly: slower than no compile on an H100.)"""
    import torch._dynamo

    from customcrafter.performance import prepare_unet_for_compiled_training

    unet = VideoCrafter2UNet.from_config(tiny_unet.config)
    unet.load_state_dict(tiny_unet.state_dict())
    unet.double().eval()  # no dropout: eager and compiled see the same network
    unet.enable_gradient_checkpointing()
    # as the trainer compiles it (compile_rewrites); aot_eager's CPU replay of the recomputation would otherwise
    # hand ATen's CPU GroupNorm a non-contiguous input, which inductor, lowering GroupNorm itself, never does
    prepare_unet_for_compiled_training(unet)
    x, t, c = _inputs(batch=1, frames=2)
    x, c = x.double(), c.double()

    def grads(model):
        unet.zero_grad()
        model(x, t, c, fps=16).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters()}

    eager = grads(unet)
    torch._dynamo.reset()
    compiled = grads(torch.compile(unet, backend="aot_eager", fullgraph=True))  # a graph break raises
    torch._dynamo.reset()
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-9, atol=1e-12, msg=name)
