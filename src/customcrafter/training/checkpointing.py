"""Resumable training checkpoints in safetensors + JSON (no pickle).

``output_dir/checkpoints/step-N/`` holds:

- ``trainable.safetensors``: the method's learned tensors (``SubjectMethod.trainable_state``);
- ``optimizer.safetensors`` + the ``optimizer`` entry of ``state.json``: AdamW's per-parameter tensors (flattened
  as ``state.<index>.<key>``) and its param groups;
- ``rng.safetensors`` + ``state.json``: the torch CPU and CUDA generators, numpy's MT19937 state, Python's
  ``random`` state and the data sampler's ``random.Random`` state - everything a run draws from - so that a resumed
  run continues bit for bit where it stopped;
- ``state.json``: step, stage, losses so far.

Written through a temporary folder and a rename: a checkpoint is either complete or absent.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from customcrafter.utils import atomic_dir, remove_tree

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "remove_checkpoints",
           "capture_rng", "restore_rng", "optimizer_to_tensors", "optimizer_from_tensors"]

logger = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d+)$")
#: what save_checkpoint leaves beside them when interrupted: atomic_dir's ``.step-N.<random>.tmp`` and ``.step-N.old``,
#: and :func:`_remove`'s ``.step-N.removed-...``
_STEP_LEFTOVER = re.compile(r"^\.step-\d+\.")


@dataclass
class Checkpoint:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    losses: list[float]
    extra: dict[str, Any]


def _random_state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _random_state_from_json(data) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


def capture_rng(data_rng: random.Random) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All random states: tensors (torch, cuda, numpy keys) and JSON (python, numpy scalars, data sampler)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    info = {"python": _random_state_to_json(random.getstate()), "data": _random_state_to_json(data_rng.getstate()),
            "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, info


def restore_rng(tensors: dict[str, torch.Tensor], info: dict[str, Any], data_rng: random.Random) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((kind, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_random_state_from_json(info["python"]))
    data_rng.setstate(_random_state_from_json(info["data"]))


def optimizer_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in info.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(checkpoints_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    data_rng: random.Random, losses: list[float], extra: dict[str, Any] | None = None,
                    keep: int = 2) -> Path:
    """Write ``checkpoints_dir/step-<step>`` atomically and prune all but the newest ``keep``."""
    target = Path(checkpoints_dir) / f"step-{step}"
    rng_tensors, rng_info = capture_rng(data_rng)
    optim_tensors, optim_info = optimizer_to_tensors(optimizer_state)
    with atomic_dir(target, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
                  str(tmp / "trainable.safetensors"))
        save_file(optim_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, "rng": rng_info,
                                                    "optimizer": optim_info, "extra": extra or {}}))
    for old in _checkpoint_dirs(checkpoints_dir)[:-keep]:
        _remove(old)
    logger.info("saved checkpoint %s", target)
    return target


def _remove(path: Path) -> None:
    """Delete a checkpoint folder, renamed first so that no half-deleted ``step-N`` is ever found by a resume."""
    remove_tree(path, "removed", ignore_errors=True)


def remove_checkpoints(checkpoints_dir: Path) -> int:
    """Delete every checkpoint in ``checkpoints_dir`` (and what interrupted writes left); returns how many entries
    went. Nothing else there is touched - the folder may be one the user keeps other files in (``--output .`` beside
    a ``checkpoints/`` of model weights) - and the folder itself goes only if that leaves it empty."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return 0
    doomed = [p for p in root.iterdir() if p.is_dir() and (_STEP_DIR.match(p.name) or _STEP_LEFTOVER.match(p.name))]
    for path in doomed:
        _remove(path)
    try:
        root.rmdir()
    except OSError:  # other files are there
        pass
    return len(doomed)


def _checkpoint_dirs(checkpoints_dir: Path) -> list[Path]:
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    complete = [p for p in _checkpoint_dirs(checkpoints_dir) if (p / "state.json").is_file()]
    return complete[-1] if complete else None


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    tensors, current = {}, path / "state.json"
    try:
        info = json.loads(current.read_text())
        for name in ("trainable", "optimizer", "rng"):
            current = path / f"{name}.safetensors"
            tensors[name] = load_file(str(current))
        current = path / "state.json"  # its entries, read below
        return Checkpoint(step=int(info["step"]), trainable=tensors["trainable"],
                          optimizer=optimizer_from_tensors(tensors["optimizer"], info["optimizer"]),
                          rng={"tensors": tensors["rng"], "info": info["rng"]},
                          losses=list(info["losses"]), extra=info.get("extra", {}))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:  # truncated, or not this format
        reason = f"no entry {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"{current}: unreadable checkpoint ({reason}); delete {path} to restart from the previous "
                         "checkpoint") from exc
