"""Shared test fixtures.

`../shared` (fixtures, DreamBooth subjects, prompts) sits beside the repository on developer machines and in CI.
Tests that need it skip with a reason when it is absent, but fail when CI=true (CI always has it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def shared_root() -> Path | None:
    env = os.environ.get("CUSTOMCRAFTER_SHARED")
    candidates = [Path(env)] if env else []
    candidates += [REPO_ROOT.parent / "shared", REPO_ROOT / "shared"]
    for c in candidates:
        if (c / "fixtures").is_dir():
            return c
    return None


def require_shared(*parts: str) -> Path:
    """Path under ../shared; skip when absent, but fail under CI=true."""
    root = shared_root()
    path = root.joinpath(*parts) if root else None
    if path is None or not path.exists():
        msg = f"../shared/{'/'.join(parts)} is not available"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{msg}, and CI=true requires it")
        pytest.skip(msg)
    return path


@pytest.fixture
def fixtures_dir() -> Path:
    """../shared/fixtures/videocrafter2_reference."""
    return require_shared("fixtures", "videocrafter2_reference")


@pytest.fixture
def dreambooth_dir() -> Path:
    """../shared/datasets/dreambooth."""
    return require_shared("datasets", "dreambooth")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
