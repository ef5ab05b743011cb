"""CUDA-graph training on a GPU (opt-in: ``pytest -m gpu``; CI has no GPU).

On the tiny model the graphed step runs the same kernels as the eager one, so every method must train bit for bit
the same weights with and without graphs, with and without gradient checkpointing, and a killed graphed run must
resume to the uninterrupted weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lora_update import lora_update_difference
from PIL import Image
from safetensors.torch import load_file

pytestmark = pytest.mark.gpu


def _images(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device")
    root = tmp_path_factory.mktemp("gpu_data")
    return _images(root / "subject", 4, 96), _images(root / "class", 3, 64)


def _train(data, out: Path, method: str, graphs: bool, **overrides):
    from customcrafter.loading import load_base_pipeline
    from customcrafter.training.config import TrainConfig
    from customcrafter.training.trainer import train

    subject, classes = data
    extra = {"dreamvideo": {"inversion_steps": 3}} if method == "dreamvideo" else {}
    settings = {"mixed_precision": "bf16"} | extra | overrides
    config = TrainConfig(base_model="tiny", method=method, subject_dir=str(subject), class_word="dog",
                         output_dir=str(out), steps=6, log_every=2, cuda_graphs=graphs, resolution=(64, 64),
                         class_images_dir=str(classes), num_class_images=3, **settings)
    result = train(config, pipe=load_base_pipeline("tiny", device="cuda"))
    weights = {f"{f.name}:{k}": v for f in result.module_dir.glob("*.safetensors") for k, v in load_file(f).items()}
    return result.losses, weights


@pytest.mark.parametrize("method", ["customcrafter", "custom_diffusion", "dreamvideo"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_graphed_training_equals_eager(data, tmp_path, method, checkpointing):
    eager_losses, eager = _train(data, tmp_path / "eager", method, False, gradient_checkpointing=checkpointing)
    graph_losses, graphed = _train(data, tmp_path / "graphs", method, True, gradient_checkpointing=checkpointing)
    assert graph_losses == eager_losses
    assert eager.keys() == graphed.keys()
    assert all(torch.equal(eager[k], graphed[k]) for k in eager)


def test_killed_graphed_run_resumes_to_the_same_weights(data, tmp_path, monkeypatch):
    import customcrafter.training.trainer as trainer

    _, uninterrupted = _train(data, tmp_path / "full", "customcrafter", True, checkpoint_every=3)
    collate, calls = trainer._collate, [0]

    def dies_at_step_5(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt("killed")
        return collate(*args, **kwargs)

    monkeypatch.setattr(trainer, "_collate", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path / "killed", "customcrafter", True, checkpoint_every=3)
    monkeypatch.setattr(trainer, "_collate", collate)
    _, resumed = _train(data, tmp_path / "killed", "customcrafter", True, checkpoint_every=3)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_compiled_graphed_training_follows_eager(data, tmp_path):
    """Regional torch.compile (inductor) inside the captured graphs, in float32 (TF32 off): inductor's fused kernels
    round differently from eager's, so losses and the learned update agree to float32 rounding, not bit for bit.

    The LoRA up-projections start at zero and AdamW's first updates are about lr x sign(gradient): every element
    whose gradient is rounding noise may step the other way. On an H100 (2026-12-06) the losses agreed to 2e-5 and
    the up-projections differed by 14.5 % of their norm (benchmarks/results/
    h100_training_compiled_graphed_tiny_session14.json); the bound, 30 %, still fails an update that is lost (100 %)
    or wrong. Exactness is checked in float64 on the CPU (tests/test_train_compile.py)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        eager_losses, eager = _train(data, tmp_path / "eager", "customcrafter", False, mixed_precision="no")
        losses, compiled = _train(data, tmp_path / "compiled", "customcrafter", True, mixed_precision="no",
                                  compile="regional", compile_rewrites=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    difference = lora_update_difference(compiled, eager)
    print(f"compiled + graphs vs eager: losses {losses} vs {eager_losses}, lora_B relative difference "
          f"{difference:.2e}")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-3, atol=0)
    assert difference < 0.3


def test_triton_temporal_attention_trains_as_sdpa_does(data, tmp_path, monkeypatch):
    """``temporal_attention="triton"``: every temporal attention of the graphed bf16 step runs the kernel forward and
    backward, and training follows the memory-efficient SDPA run's losses. (The gradients themselves are checked
    against float64 in tests/test_gpu_kernels.py; the learned LoRA updates of two bf16 runs cannot be compared here:
    on this tiny model each differs from a float32 run's by ~95 % after 6 steps, AdamW's first steps moving each
    element by about lr x sign(gradient), H100 2026-12-07.)"""
    from customcrafter import kernels

    efficient_losses, _ = _train(data, tmp_path / "efficient", "customcrafter", True, temporal_attention="efficient")
    backward = torch.ops.customcrafter.temporal_attention_backward
    calls = []
    monkeypatch.setattr(torch.ops.customcrafter, "temporal_attention_backward",
                        lambda *a: calls.append(a[0].shape) or backward(*a))
    supported = kernels.temporal_attention_supported
    answers = []
    monkeypatch.setattr(kernels, "temporal_attention_supported",
                        lambda *a: answers.append(supported(*a)) or answers[-1])
    losses, _ = _train(data, tmp_path / "triton", "customcrafter", True, temporal_attention="triton")
    assert answers and all(answers)  # no temporal layer fell back to PyTorch
    assert calls  # the backward kernel ran
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(efficient_losses), rtol=2e-2, atol=0)


def test_cudnn_benchmark_is_on_while_training_and_put_back(data, tmp_path, monkeypatch):
    """``cudnn_benchmark``: cuDNN times its algorithms during training only; the process-wide flag is restored."""
    from customcrafter.training import trainer

    seen = []
    forward = trainer.DiffusionLoss.forward
    monkeypatch.setattr(trainer.DiffusionLoss, "forward",
                        lambda self, batch: (seen.append(torch.backends.cudnn.benchmark), forward(self, batch))[1])
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    losses, _ = _train(data, tmp_path / "bench", "customcrafter", True, cudnn_benchmark=True)
    assert seen and all(seen) and not torch.backends.cudnn.benchmark
    assert all(np.isfinite(losses))
