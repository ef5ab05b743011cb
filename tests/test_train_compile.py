"""Training through a torch.compile'd UNet: the per-example dropout masks must not make it recompile.

The compiled code reads each dropout layer's masks as a fixed tensor (static mode), never the example seeds or the
layer's index, so the regional compile of the tiny UNet traces each distinct block once and changing the seeds from
step to step compiles nothing new. The tracing backends used here ('eager', 'aot_eager') compile in seconds on a
CPU and run the same operators as eager mode, so the results must match eager training; inductor's generated
kernels are checked on the GPU (tests/test_gpu_training.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from lora_update import lora_update_difference
from safetensors.torch import load_file

from customcrafter.training.config import TrainConfig


def _step_inputs(step: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(2, 4, 3, 8, 8, generator=g, dtype=dtype, requires_grad=True)
    return x, torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=g, dtype=dtype), torch.tensor([16, 16])


def _train_steps(unet, steps: int, dtype=torch.float32, backward: bool = True) -> list[tuple]:
    """``steps`` steps of ``unet`` with per-example dropout in static mode, new seeds each step: per step the output
    (and with ``backward`` the input's and conv_in's gradients) and dynamo's unique-graph count after it."""
    from torch._dynamo.utils import counters

    from customcrafter.training.trainer import install_example_dropout

    seeds, _ = install_example_dropout(unet.train())
    seeds.use_static_masks(True)
    results = []
    for step in range(steps):
        x, t, context, fps = _step_inputs(step, dtype)
        seeds.set([2 * step + 1, 2 * step + 2])
        seeds.ensure_masks(lambda: unet(x, t, encoder_hidden_states=context, fps=fps))  # noqa: B023 (called now)
        out = unet(x, t, encoder_hidden_states=context, fps=fps).sample
        grads = ()
        if backward:
            out.pow(2).mean().backward()
            grads = (x.grad, unet.conv_in.weight.grad.clone())
            unet.zero_grad()
        results.append(((out.detach(), *grads), counters["stats"]["unique_graphs"]))
    return results


def test_regional_compile_with_example_dropout_traces_each_block_once_and_equals_eager():
    import torch._dynamo
    from torch._dynamo.utils import counters

    from customcrafter.loading import build_tiny_pipeline
    from customcrafter.performance import compile_unet

    torch._dynamo.reset()
    counters.clear()
    eager = build_tiny_pipeline().unet.double()
    compiled = copy.deepcopy(eager)
    reference = _train_steps(eager, 3, torch.float64)
    compile_unet(compiled, "regional", backend="aot_eager")
    results = _train_steps(compiled, 3, torch.float64)
    assert [graphs for _, graphs in reference] == [0, 0, 0]
    # every block class and shape traced at the first step; later steps (new seeds, new masks) trace nothing
    graphs = [graphs for _, graphs in results]
    assert 0 < graphs[0] == graphs[1] == graphs[2] < 60
    for (ours, _), (theirs, _) in zip(results, reference, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            assert ((a - b).norm() / b.norm()).item() < 1e-10
    # the masks did change between steps (the dropout is live)
    assert not torch.equal(reference[0][0][0], reference[1][0][0])


def test_compiled_training_rewrites_keep_the_function_and_its_gradients(monkeypatch):
    """``compile_rewrites``: channels-last convolutions and the fusions' rewrites (sub-pixel upsampling with its
    summed weights, channel-statistics GroupNorm, unfused bias, cross-attention context once per video) give the
    eager UNet's output and gradients, to the gradients of the trained LoRA layers and of the convolution weights."""
    from peft import LoraConfig

    from customcrafter import fusions
    from customcrafter.loading import build_tiny_pipeline
    from customcrafter.performance import prepare_unet_for_compiled_training
    from customcrafter.training.trainer import install_example_dropout

    reference = build_tiny_pipeline().unet.train().double()
    target = r".*attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v)"
    reference.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=target, init_lora_weights=False))
    reference.double()
    rewritten = copy.deepcopy(reference)
    prepare_unet_for_compiled_training(rewritten)
    assert any(isinstance(m, fusions.SubpixelUpsample2D) for m in rewritten.modules())
    assert any(isinstance(m, fusions.ChannelStatsGroupNorm) for m in rewritten.modules())
    assert rewritten.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert rewritten.context_per_video  # cross-attention keys and values once per video
    subpixel_calls = []
    original = fusions.subpixel_upsample_conv
    monkeypatch.setattr(fusions, "subpixel_upsample_conv",
                        lambda *args: subpixel_calls.append(args[0].shape) or original(*args))
    results = []
    for unet in (reference, rewritten):
        seeds, _ = install_example_dropout(unet)
        seeds.set([3])
        # 48x48 latents: the last upsampler's 24x24 input is large enough for the sub-pixel form
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 2, 48, 48, generator=g, dtype=torch.float64, requires_grad=True)
        context = torch.randn(1, 7, 32, generator=g, dtype=torch.float64)
        out = unet(x, torch.tensor([700]), encoder_hidden_states=context, fps=torch.tensor([16])).sample
        out.pow(2).mean().backward()
        grads = {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}
        results.append((out.detach(), x.grad, grads))
    (out, x_grad, grads), (ref, x_ref, grads_ref) = results[1], results[0]
    assert any("lora_A" in n for n in grads_ref) and grads.keys() == grads_ref.keys()
    assert subpixel_calls  # the sub-pixel form ran (with its gradient)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(out, ref) < 1e-10 and rel(x_grad, x_ref) < 1e-10
    assert max(rel(grads[n], grads_ref[n]) for n in grads_ref) < 1e-8


def test_full_compile_traces_the_training_forward_as_one_graph():
    """``compile: full``: the whole UNet forward, live dropout included, is one graph without breaks, traced once
    for every step (dynamo's 'eager' backend: the traced graph run as it is, so the output equals eager mode's)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from customcrafter.loading import build_tiny_pipeline
    from customcrafter.performance import compile_unet

    torch._dynamo.reset()
    counters.clear()
    unet = build_tiny_pipeline().unet
    reference = _train_steps(copy.deepcopy(unet), 2, backward=False)
    compile_unet(unet, "full", backend="eager")
    results = _train_steps(unet, 2, backward=False)
    assert [graphs for _, graphs in results] == [1, 1]
    assert not counters["graph_break"]
    for ((ours,), _), ((theirs,), _) in zip(results, reference, strict=True):
        assert torch.equal(ours, theirs)


def _config(tmp_path: Path, dreambooth_dir: Path, name: str) -> TrainConfig:
    return TrainConfig(base_model="tiny", subject_dir=str(dreambooth_dir / "dog"), class_word="dog",
                       output_dir=str(tmp_path / name), resolution=(64, 96), num_frames=2, steps=3,
                       prior_preservation=True, class_images_dir=str(dreambooth_dir / "dog2"), num_class_images=2,
                       checkpoint_every=None, lr=1e-3, log_every=1)


def test_training_through_a_compiled_unet_equals_eager_training(tmp_path, dreambooth_dir):
    """train() with an already compiled UNet switches its dropout to fixed masks, draws them once outside the
    compiled code, and trains what eager training trains."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from customcrafter.loading import load_base_pipeline
    from customcrafter.performance import compile_unet
    from customcrafter.training.trainer import train

    torch._dynamo.reset()
    counters.clear()
    results = {}
    for name in ("eager", "compiled"):
        pipe = load_base_pipeline("tiny")
        if name == "compiled":
            compile_unet(pipe.unet, "regional", backend="aot_eager")
        result = train(_config(tmp_path, dreambooth_dir, name), pipe=pipe)
        weights = load_file(str(result.module_dir / "adapter_model.safetensors"))
        results[name] = result.losses, weights
    graphs = counters["stats"]["unique_graphs"]
    print(f"unique graphs {graphs}")
    assert 0 < graphs < 60  # each block class and shape once, not once per dropout layer or step
    (eager_losses, eager), (compiled_losses, compiled) = results["eager"], results["compiled"]
    assert len(compiled_losses) == 3
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=0)
    assert eager.keys() == compiled.keys()
    difference = lora_update_difference(compiled, eager)
    print(f"lora_B relative difference {difference:.2e}")
    assert difference < 1e-3


def test_compiled_parts_are_detected_in_either_form():
    from customcrafter.training.trainer import _has_compiled_parts

    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert not _has_compiled_parts(plain)
    plain[1].compile()  # in place, as customcrafter.performance.compile_unet does
    assert _has_compiled_parts(plain)
    assert _has_compiled_parts(torch.nn.Sequential(torch.compile(torch.nn.Linear(2, 2))))  # torch.compile's wrapper
