"""benchmarks/gpu.py's defaults time what the product runs, and its variant strings fail fast (CPU: nothing is run)."""

import importlib.util
from pathlib import Path

import pytest

from customcrafter.performance import SpeedConfig
from customcrafter.training.config import TrainConfig

GPU_BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", GPU_BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_sampling_variants_are_the_products_eager_and_compiled_paths(gpu_benchmark):
    configs = [gpu_benchmark.SAMPLING_VARIANTS[name] for name in gpu_benchmark.DEFAULT_SAMPLING_VARIANTS]
    # `customcrafter sample` (one-off videos) and the pipeline's evaluation sampling (orchestration/local_run.py)
    assert configs == [SpeedConfig(), SpeedConfig(compile="full")]


def test_default_training_variants_include_the_cli_default_and_the_compiled_rows(gpu_benchmark):
    parsed = [gpu_benchmark.parse_train_variant(v) for v in gpu_benchmark.DEFAULT_TRAIN_VARIANTS]
    cli = TrainConfig(subject_dir="unused", base_model="random")
    # on a GPU the trainer's None defaults resolve to checkpointing and CUDA graphs on, no compilation
    assert (cli.gradient_checkpointing, cli.cuda_graphs, cli.compile, cli.num_frames) == (None, None, "none", 4)
    assert parsed[0] == (4, True, {"cuda_graphs": True})
    assert (4, True, {"cuda_graphs": True, "compile": "full"}) in parsed
    assert (16, False, {"cuda_graphs": True, "compile": "full"}) in parsed
    for _, _, overrides in parsed:  # every override is a real TrainConfig field
        TrainConfig(subject_dir="unused", base_model="random", **overrides)


@pytest.mark.parametrize("variant, message", [
    ("16:nockpt:ful", "unknown option 'ful'"),
    ("16", "expected FRAMES:ckpt|nockpt"),
    ("sixteen:ckpt", "expected FRAMES:ckpt|nockpt"),
    ("4:checkpoint", "expected FRAMES:ckpt|nockpt"),
])
def test_a_mistyped_training_variant_stops_before_anything_runs(gpu_benchmark, monkeypatch, variant, message):
    ran = []
    monkeypatch.setattr(gpu_benchmark, "run", ran.append)
    monkeypatch.setattr("sys.argv", ["gpu.py", "--sections", "training", "--train-variants", "4:ckpt", variant])
    with pytest.raises(SystemExit, match=message) as stop:
        gpu_benchmark.main()
    assert variant in str(stop.value) and not ran


def test_variants_all_expands_to_every_sampling_variant(gpu_benchmark, monkeypatch):
    ran = []
    monkeypatch.setattr(gpu_benchmark, "run", ran.append)
    monkeypatch.setattr("sys.argv", ["gpu.py", "--sections", "sampling", "--variants", "all"])
    gpu_benchmark.main()
    assert ran[0].variants == list(gpu_benchmark.SAMPLING_VARIANTS)
